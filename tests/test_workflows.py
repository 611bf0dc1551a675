"""The GitHub workflows: their structure, the PR's model check (`mlops train --fail-on-reject`) and act.

- Structure (no servers): triggers and paths, every `run:` step a `make` or `mlops` command or shell
  plumbing around one, secrets only in `env:` and never printed, no gate threshold in YAML.
- The PR verdict read off the flow's decision (`mlops.ci_cli.judge`), and its Markdown summary.
- On the session stack: model.yml's own champion and candidate `run:` scripts, executed as GitHub runs
  them (bash -eo pipefail), with a candidate identical to the champion (neutral, exit 0).
- With act (host mode, offline): the whole model job, its `uses:` actions replaced by local stand-ins
  (GitHub, where act downloads actions from, is not reachable here); a weak candidate fails the job
  (exit 3, a REJECT summary with the run's model card).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.evaluation.decision import Decision, GateResult, Gates
from mlops.ci_cli import REJECT_EXIT, judge, summary_markdown

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent
# What a `run:` line may start with: the project's commands, and shell plumbing around them.
COMMANDS = {"make", ".venv/bin/mlops", "mlops"}
PLUMBING = {"if", "then", "else", "fi", "[", "test", "echo", "cat", "read", "exit", "gh"}


def _load(name: str) -> dict:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads a bare `on` as true
    return workflow


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def _step(workflow: dict, name_part: str) -> dict:
    [step] = [s for s in _steps(workflow) if name_part in s.get("name", "")]
    return step


def _commands(script: str) -> list[list[str]]:
    """Each simple command of a `run:` script, split into words (good enough for these scripts)."""
    commands = []
    for line in script.splitlines():
        for part in re.split(r"&&|\|\||;|\bthen\b|\belse\b", line.split(" #")[0]):
            words = shlex.split(part.replace("<<<", " "), posix=True) if part.strip() else []
            if words:
                commands.append(words)
    return commands


def _run_lines(step: dict) -> str:
    return step.get("run", "")


ALL = ["ci.yml", "model.yml", "cd.yml"]


# --- structure --------------------------------------------------------------------------------------


def test_the_three_workflows_parse_and_name_their_triggers():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == sorted(ALL)
    ci, model, cd = (_load(name) for name in ALL)
    assert set(ci["on"]) == {"push", "pull_request"}
    assert set(model["on"]) == {"pull_request", "workflow_dispatch"}
    paths = model["on"]["pull_request"]["paths"]
    for wanted in (
        "core/**",
        "core/configs/**",
        "adapters/**",
        "dask_engine/**",
        "tasks/**",
        "flows/**",
        "services/**",
    ):
        assert wanted in paths
    assert set(cd["on"]) == {"push", "workflow_dispatch"}
    assert cd["on"]["push"] == {"branches": ["main"], "tags": ["v*"]}


def test_ci_runs_what_dot_ci_run_runs():
    ci = _load("ci.yml")
    runs = [s["run"] for s in _steps(ci) if "run" in s]
    assert runs == ["make lint", "make test"]
    dot_ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make")]
    assert dot_ci == runs
    [setup] = [s for s in _steps(ci) if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup["with"]["python-version"] == "3.11"


@pytest.mark.parametrize("name", ALL)
def test_every_run_step_is_make_or_mlops_or_plumbing_around_them(name):
    workflow = _load(name)
    seen = set()
    for step in _steps(workflow):
        for words in _commands(_run_lines(step)):
            first = words[0]
            assert first in COMMANDS | PLUMBING, f"{name}: {step.get('name')}: {' '.join(words)}"
            seen.add(first)
    assert seen & COMMANDS, f"{name} runs no make or mlops command"


@pytest.mark.parametrize("name", ALL)
def test_secrets_are_named_only_in_env_and_never_printed(name):
    text = (WORKFLOWS / name).read_text()
    workflow = _load(name)
    scopes = [workflow, *workflow["jobs"].values(), *_steps(workflow)]
    secret_vars = {
        var for scope in scopes for var, value in (scope.get("env") or {}).items() if "secrets." in str(value)
    }
    for step in _steps(workflow):
        script = _run_lines(step)
        assert "secrets." not in script, f"{name}: a secret is interpolated into a script"
        assert "set -x" not in script
        for words in _commands(script):
            if words[0] in {"echo", "cat", "printf"}:
                assert not any(f"${var}" in " ".join(words) for var in secret_vars), words
    assert "GITHUB_TOKEN" not in text or "GH_TOKEN: ${{ secrets.GITHUB_TOKEN }}" in text


def test_cd_deploys_runs_training_and_waits_with_the_server_from_secrets():
    cd = _load("cd.yml")
    [job] = cd["jobs"].values()
    # the Prefect server and the S3 store holding the catalog come from secrets; the model from a variable
    assert job["env"] == {
        "PREFECT_API_URL": "${{ secrets.PREFECT_API_URL }}",
        "PREFECT_API_KEY": "${{ secrets.PREFECT_API_KEY }}",
        "AWS_ENDPOINT_URL_S3": "${{ secrets.AWS_ENDPOINT_URL_S3 }}",
        "AWS_ACCESS_KEY_ID": "${{ secrets.AWS_ACCESS_KEY_ID }}",
        "AWS_SECRET_ACCESS_KEY": "${{ secrets.AWS_SECRET_ACCESS_KEY }}",
        "CD_MODEL": "${{ vars.CD_MODEL || 'credit-risk' }}",
    }
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert ".venv/bin/mlops deploy" in runs
    [run_training] = [r for r in runs if "run-deployment" in r]
    assert run_training.startswith('.venv/bin/mlops run-deployment "training/$CD_MODEL" --wait')


def test_install_beside_runs_the_checkouts_own_install_when_its_lock_differs(tmp_path):
    # (the same lock, the job's usual case, is what the act test below runs: its base is the PR's commit)
    checkout = tmp_path / "base"
    checkout.mkdir()
    (checkout / "requirements.lock").write_text("numpy==1.0.0 \\\n    --hash=sha256:00\n")
    (checkout / "Makefile").write_text("install:\n\t@echo its own install\n")
    result = subprocess.run(
        # -o install: this venv as it is (a test never reinstalls it)
        ["make", "--no-print-directory", "-o", "install", "-C", str(ROOT), "install-beside", f"CHECKOUT={checkout}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "its own install" in result.stdout and not (checkout / ".venv").exists()


def test_model_job_trains_the_base_champion_then_judges_the_pr_candidate():
    model = _load("model.yml")
    steps = _steps(model)
    checkouts = [s for s in steps if s.get("uses", "").startswith("actions/checkout@")]
    assert [c["with"]["path"] for c in checkouts] == ["pr", "base"]
    assert "github.event.pull_request.base.sha" in checkouts[1]["with"]["ref"]
    runs = [s.get("run", "") for s in steps]
    assert "make -C pr install" in runs and "make -C pr install-beside CHECKOUT=../base" in runs
    order = [
        _step(model, "Start the local stack"),
        _step(model, "Generate the bundled data"),
        _step(model, "champion with the base"),
        _step(model, "candidate with the PR"),
        _step(model, "job summary"),
        _step(model, "Comment on the PR"),
        _step(model, "Stop the stack"),
    ]
    assert [steps.index(s) for s in order] == sorted(steps.index(s) for s in order)
    stack_up, data, champion, candidate, summary, comment, stop = order
    assert ".venv/bin/mlops stack up" in stack_up["run"] and "mlops data generate" in data["run"]
    assert champion["working-directory"] == "base" and "--dry-run" not in champion["run"]
    assert candidate["working-directory"] == "pr"
    for option in ("--dry-run", '--summary "$SUMMARY"', "--fail-on-reject"):
        assert option in candidate["run"]
    assert "continue-on-error" not in candidate  # a rejected candidate fails the job
    assert '>> "$GITHUB_STEP_SUMMARY"' in summary["run"] and summary["if"] == "${{ !cancelled() }}"
    assert "gh pr comment" in comment["run"] and comment["env"]["GH_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    assert stop["if"] == "${{ always() }}" and "mlops stack down" in stop["run"]
    assert model["permissions"] == {"contents": "read", "pull-requests": "write"}


def test_no_gate_threshold_in_any_workflow():
    # Promotion is the flow's own gated decision: no workflow restates a gate.
    names = [*Gates.model_fields, "roc_auc", "rmse", "threshold"]
    for name in ALL:
        text = (WORKFLOWS / name).read_text()
        assert not [n for n in names if n in text], name


def test_actionlint_passes():
    result = subprocess.run(
        [
            str(BIN / "actionlint"),
            f"-shellcheck={BIN / 'shellcheck'}",
            "-pyflakes=",
            *map(str, WORKFLOWS.glob("*.yml")),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the PR verdict ---------------------------------------------------------------------------------


def _decision(promote=False, checks=(), interval=None, champion="3", champion_metrics=None) -> Decision:
    return Decision(
        promote=promote,
        reasons=["a reason"],
        candidate_metrics={"roc_auc": 0.8},
        champion_version=champion,
        champion_metrics={"roc_auc": 0.8} if champion_metrics is None and champion else champion_metrics,
        primary_metric="roc_auc",
        interval=interval,
        checks=list(checks),
    )


def _interval(low: float, high: float) -> dict:
    return {"delta": (low + high) / 2, "low": low, "high": high, "confidence": 0.95}


PASS = GateResult("slices", True, "no slice drops")
NOT_BEATEN = GateResult("beats_champion", False, "within noise")


def test_a_promoted_candidate_is_promote():
    assert judge(_decision(promote=True, checks=[PASS], interval=_interval(0.01, 0.03))).verdict == "promote"


def test_not_better_beyond_noise_is_neutral_and_does_not_block():
    verdict = judge(_decision(checks=[PASS, NOT_BEATEN], interval=_interval(-0.01, 0.01)))
    assert verdict.verdict == "neutral" and not verdict.blocks


def test_worse_beyond_noise_is_reject():
    verdict = judge(_decision(checks=[PASS, NOT_BEATEN], interval=_interval(-0.05, -0.02)))
    assert verdict.verdict == "reject" and verdict.blocks
    assert "worse than the champion's beyond noise" in verdict.why and "[-0.0500, -0.0200]" in verdict.why


def test_a_failed_gate_is_reject_even_when_the_candidate_is_better():
    failed = GateResult("fairness", False, "dp difference 0.3 > 0.1")
    verdict = judge(_decision(checks=[failed, GateResult("beats_champion", True, "")], interval=_interval(0.01, 0.1)))
    assert verdict.verdict == "reject" and "fairness: dp difference 0.3 > 0.1" in verdict.why


def test_a_champion_the_pr_cannot_score_is_reject():
    # decide() leaves the champion's metrics out when it could not score the champion
    verdict = judge(Decision(False, ["r"], {"roc_auc": 0.8}, champion_version="4", champion_metrics=None))
    assert verdict.verdict == "reject" and "cannot score the current champion v4" in verdict.why


def test_a_cold_start_that_fails_a_gate_is_reject():
    cold = Decision(False, ["r"], {"roc_auc": 0.6}, checks=[GateResult("min_roc_auc", False, "0.6 < 0.7")])
    assert judge(cold).verdict == "reject"


def test_the_summary_nests_the_card_and_says_what_blocks():
    decision = _decision(checks=[PASS, NOT_BEATEN], interval=_interval(-0.05, -0.02))
    card = "# Model card: credit-risk\n\n**Verdict: REJECT**\n\n## Gates\n\n| a | b |\n"
    text = summary_markdown(judge(decision), decision, "credit-risk", "v-abc", card)
    assert text.startswith("## Model check: REJECT: worse than the champion or unsafe: blocks the merge")
    assert "rows of data version `v-abc`\n\n### Model card: credit-risk" in text and "\n#### Gates\n" in text
    assert "champion v3, on the same holdout rows of data version `v-abc`" in text
    fallback = summary_markdown(judge(decision), decision, "credit-risk", "v-abc", None)
    assert "could not be read" in fallback and "### Promotion decision: **REJECT**" in fallback
    long = summary_markdown(judge(decision), decision, "m", "v", "x" * 100_000)
    assert len(long) < 65_536 and long.rstrip().endswith("`model_card/`)")


# --- model.yml's own steps on the session stack -----------------------------------------------------


def _run_step(step: dict, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a step's script as GitHub does (bash -eo pipefail), from the checkout it names (here: ROOT)."""
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ci_champion(stack, default_data, tmp_path_factory):
    """A champion of its own model (`ci-check`), trained by model.yml's champion step; returns the options."""
    from core.data.dataset import bundled_config_text

    config = tmp_path_factory.mktemp("ci") / "ci-check.yaml"
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": "ci-check", "model_name": "ci-check"}
    config.write_text(yaml.safe_dump(raw))
    options = f"--config {config} --trials 1"
    result = _run_step(_step(_load("model.yml"), "champion with the base"), {"SEED": "42", "TRAIN_OPTIONS": options})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PROMOTED" in result.stdout
    return options


@pytest.mark.integration
@pytest.mark.slow
def test_a_candidate_as_good_as_the_champion_is_neutral_and_passes(ci_champion, tmp_path):
    summary = tmp_path / "model-check.md"
    # --force: the same code, data and options as the champion's would otherwise stop as "nothing new"
    env = {"SEED": "42", "SUMMARY": str(summary), "TRAIN_OPTIONS": ci_champion, "CANDIDATE_OPTIONS": "--force"}
    result = _run_step(_step(_load("model.yml"), "candidate with the PR"), env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "decision: reject -> not promoted" in result.stdout  # the flow does not promote it ...
    assert "PR verdict: neutral" in result.stdout  # ... and it does not block the PR
    assert summary.read_text().startswith("## Model check: NEUTRAL")


# --- cd.yml's own steps on the session stack --------------------------------------------------------


# Models of this module's own in the catalog: cd.yml deploys the catalog; a scoring deployment that fails.
CD_MODEL = "cd-credit-risk"
BROKEN_MODEL = "workflows-broken-scoring"


def _raw(model: str) -> dict:
    from core.data.dataset import bundled_config_text

    return yaml.safe_load(bundled_config_text("credit-risk")) | {"name": model, "model_name": model}


@pytest.mark.integration
@pytest.mark.slow
def test_cd_steps_deploy_run_training_and_wait_for_it(stack, default_data):
    from tests.catalog import put_model

    # Given a model in the catalog (the bundled dataset, a small search), as `mlops models add` puts it there
    put_model(stack, _raw(CD_MODEL), search={"trials_per_family": 1, "cv_folds": 2})
    [job] = _load("cd.yml")["jobs"].values()
    # the job's CD_MODEL (the repository variable) names the model whose training runs
    assert "CD_MODEL" in job["env"]
    env = {
        "PREFECT_API_URL": stack.prefect_api_url,
        "PREFECT_API_KEY": "",
        "GITHUB_REF_NAME": "main",
        "CD_MODEL": CD_MODEL,
    }
    outputs = []
    for step in job["steps"]:
        if "run" in step:
            result = _run_step(step, env, timeout=1800)
            outputs.append(result.stdout)
            assert result.returncode == 0, f"{step.get('name')}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    deploy, run = outputs[-2:]
    assert f"deployed training/{CD_MODEL}: " in deploy, deploy
    assert f"started training/{CD_MODEL}: " in run and f"{stack.prefect_ui_url}/runs/flow-run/" in run
    assert re.search(r"flow run \S+: Completed", run), run


@pytest.mark.integration
@pytest.mark.slow
def test_run_deployment_fails_when_the_run_fails_and_prints_its_url(stack, default_data):
    # Given a model's scoring deployment whose default source (its config's scoring source) does not exist
    from deployments.automations import remove_model_automations
    from services.catalog import remove_model
    from tests.catalog import deploy_model

    raw = _raw(BROKEN_MODEL)
    deploy_model(
        stack, raw, scoring_source=f"s3://{stack.bucket}/no-such-partition/", training_cron=None, monitoring_cron=None
    )
    try:
        command = [str(BIN / "mlops"), "run-deployment", f"scoring/{BROKEN_MODEL}", "--wait", "--timeout", "600"]
        result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, timeout=900)
    finally:
        remove_model(BROKEN_MODEL, stack)  # its deployments and its catalog entry (as `mlops models remove`)
        remove_model_automations(BROKEN_MODEL)
    # then the command names the run's URL and its state, and exits 1
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{stack.prefect_ui_url}/runs/flow-run/" in result.stdout
    assert re.search(r"flow run \S+: Failed", result.stdout), result.stdout
    missing = subprocess.run(
        [str(BIN / "mlops"), "run-deployment", "no-such-flow"], check=False, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 1 and "run `mlops deploy` first" in missing.stderr


# --- the whole model job under act ------------------------------------------------------------------

# act runs `uses:` actions by cloning them from GitHub, which is not reachable here: each is replaced by a
# local stand-in (--local-repository). checkout clones this repository (a `path`, a `ref`); setup-python
# and upload-artifact do nothing (the host's python3 is 3.11).
CHECKOUT_STANDIN = """name: checkout (offline stand-in)
inputs:
  path: {default: "."}
  ref: {default: ""}
runs:
  using: composite
  steps:
    - shell: bash
      env: {DEST: "${{ inputs.path }}", REF: "${{ inputs.ref }}"}
      run: |
        git clone --quiet "$ACT_CHECKOUT_SOURCE" "$DEST"
        if [ -n "$REF" ]; then git -C "$DEST" checkout --quiet "$REF"; fi
"""
NOOP_STANDIN = """name: no-op (offline stand-in)
runs:
  using: composite
  steps:
    - {shell: bash, run: "true"}
"""


def _standins(folder: Path, workflow: dict) -> list[str]:
    """--local-repository options for every action the workflow uses."""
    options = []
    for uses in sorted({s["uses"] for s in _steps(workflow) if "uses" in s}):
        action = folder / uses.replace("/", "_").replace("@", "_")
        action.mkdir(parents=True)
        (action / "action.yml").write_text(CHECKOUT_STANDIN if "checkout" in uses else NOOP_STANDIN)
        options += ["--local-repository", f"{uses}={action}"]
    return options


@pytest.mark.integration
@pytest.mark.slow
def test_act_runs_the_model_job_and_a_weak_candidate_fails_it(tmp_path):
    from tests.ports import stack_ports

    if not (ROOT / ".git").exists():
        pytest.skip("act needs the project as a git repository (it clones the committed HEAD)")
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True, timeout=120)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    ports = stack_ports()
    env_options = [f"--env={k}={v}" for k, v in ports.items()] + [f"--env=ACT_CHECKOUT_SOURCE={repo}"]
    # Nothing of the session stack (or a developer's) leaks into the job: it starts its own.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "PREFECT_", "MLFLOW_", "AWS_"))}
    inputs = {
        "base": head.stdout.strip(),  # the champion from this same commit
        "data_options": "--months 4 --rows-per-month 1500",
        "train_options": "--trials 1",
        "candidate_options": "--family decision_tree",  # the weak candidate
    }
    command = [
        str(BIN / "act"),
        "workflow_dispatch",
        "--workflows=.github/workflows/model.yml",
        "--job=compare",
        "--platform=ubuntu-latest=-self-hosted",  # host mode: no Docker
        "--cache-server-addr=127.0.0.1",
        f"--action-cache-path={tmp_path / 'act-cache'}",
        "--no-skip-checkout",  # act would copy the workspace for the first checkout and ignore its `path`
        "--env-file=/dev/null",
        *_standins(tmp_path / "actions", _load("model.yml")),
        *env_options,
        *[f"--input={k}={v}" for k, v in inputs.items()],
    ]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=repo, env=clean, timeout=1800)
    finally:  # the job's last step stops its stack; this is for a job that never got there
        from adapters.settings import Settings
        from mlops import stack as local_stack

        # In host mode act copies the repository to <action-cache-path>/<hash>/hostexecutor, the job's workspace.
        [workspace] = (tmp_path / "act-cache").glob("*/hostexecutor")
        settings = Settings(state_dir=workspace / ".mlops", **{k[6:].lower(): v for k, v in ports.items()})
        left = local_stack.down(settings)
    log = result.stdout + result.stderr
    (tmp_path / "act.log").write_text(log)
    assert result.returncode != 0, log[-5000:]
    assert "Job failed" in log, log[-5000:]
    for passed in ("Start the local stack", "Generate the bundled data", "Train the champion with the base"):
        assert re.search(rf"Success - Main {re.escape(passed)}", log), f"{passed}: {log[-5000:]}"
    assert re.search(r"Failure - Main Train the candidate with the PR", log), log[-5000:]
    assert f"exit status {REJECT_EXIT}" in log, log[-5000:]
    assert re.search(r"Success - Main Publish the decision", log) and re.search(r"Success - Main Stop the stack", log)
    assert left == [], f"the job's last step left {left} running"
    summary = (workspace / "model-check.md").read_text()
    assert summary.startswith("## Model check: REJECT: worse than the champion or unsafe: blocks the merge")
    # judged against the base's champion, as a dry run; the run's model card nested, naming the failed check
    assert "`credit-risk` champion v1" in summary and "nothing registered or promoted" in summary, summary
    assert "Verdict: REJECT" in summary and "beats_champion" in summary, summary
    # act shows what a step appends to $GITHUB_STEP_SUMMARY in its log (and empties the file after each step)
    assert "Summary - ## Model check: REJECT: worse than the champion or unsafe" in log, log[-5000:]
