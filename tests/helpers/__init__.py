"""What several test modules share, so that no test module imports another (tests/ is on sys.path: pytest puts
it there, and tests/conftest.py rewrites the asserts of this package too):

    helpers.lama    a LAMA-shaped data set (make_lama) and an exported LAMA prompt (lama_prompt)
    helpers.cli     `ptuning train lama` commands on that data set and how the tests run and compare them
    helpers.search  a tiny real training for Optuna's trials (imported by the search tests' worker processes)
    helpers.prefect a flow run's logs from Prefect's API
    helpers.clock   a fake clock for the code that takes an injectable one
"""
