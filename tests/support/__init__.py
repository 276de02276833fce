"""What the tests share besides fixtures: data paths, checkpoint and corpus builders, servers and processes.

Test modules import these by name (`from support.data import NIH_PNG`); tests/ is on sys.path through pytest's
`pythonpath` setting. conftest.py holds only the fixtures and hooks, which pytest hands to tests itself.
Scripts run outside pytest (benchmarks, tests/e2e/screenshot.py) put tests/ on sys.path first
(tests/e2e/livesite.py's `import_support`).
"""
