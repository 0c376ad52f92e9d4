"""Benchmark commands (`music bench <what>`): each module has a `main()` that prints figures."""
