"""Seconds to load the Dagster code location, as `dagster dev` and every run worker do, in fresh processes."""
import statistics
import subprocess
import sys
import time

from music_dagster.config import PROJECT_ROOT

_LOAD = "import music_dagster.definitions as d; d.defs.resolve_asset_graph()"


def _seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT)
    return time.perf_counter() - start


def main(repeats: int = 3) -> None:
    interpreter = [_seconds("pass") for _ in range(repeats)]
    dagster = [_seconds("import dagster") for _ in range(repeats)]
    location = [_seconds(_LOAD) for _ in range(repeats)]
    print(f"{'what':<40} {'median s':>9} {'min s':>7}")
    for name, times in (("python start", interpreter), ("import dagster", dagster),
                        ("load music_dagster.definitions", location)):
        print(f"{name:<40} {statistics.median(times):>9.2f} {min(times):>7.2f}")
    print(f"{'code location beyond import dagster':<40} {statistics.median(location) - statistics.median(dagster):>9.2f}")


if __name__ == "__main__":
    main()
