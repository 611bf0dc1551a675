"""Pages generated at build time (mkdocs-gen-files): the configuration reference and the latest benchmark tables.

- `reference/configuration.md` from the pydantic models (`mlops/reference.py`), so it cannot drift from the code;
- `benchmarks-latest.md` from `bench/results/*.md`, each benchmark's table as last written by its run.
"""

from pathlib import Path

import mkdocs_gen_files

from mlops.reference import configuration_reference

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"

with mkdocs_gen_files.open("reference/configuration.md", "w") as page:
    page.write(configuration_reference())

with mkdocs_gen_files.open("benchmarks-latest.md", "w") as page:
    page.write("# Latest benchmark tables\n\nEach benchmark's table as its last run wrote it in `bench/results/`.\n\n")
    for result in sorted(RESULTS.glob("*.md")):
        text = result.read_text()
        # each result file's own title becomes a section of this page
        lines = [("#" + line) if line.startswith("#") else line for line in text.splitlines()]
        page.write(f"\n<!-- {result.name} -->\n" + "\n".join(lines) + "\n")
