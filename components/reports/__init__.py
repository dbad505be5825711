"""Reports: a benchmark's result table run end to end and written up (`ptuning report <benchmark>`).

    store.py    one JSON file per finished unit (method, task, seed): a killed report resumes where it stopped
    figures.py  matplotlib PNGs
    lama.py     the paper's Table 2 on one model: reports/lama/<model>/{results.json, REPORT.md, *.png}
"""
