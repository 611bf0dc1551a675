"""Pure functions and value types: metrics, gates, the decision, statistics, rendering. No I/O."""
