"""The steps of iterated Safe RLHF's rounds (rounds.py runs them in order):

    collect.py    the last policy answers a fresh prompt set; pairs of its answers are exported
    label.py      the pairs labelled (simulated annotators or people), checked, read by last round's models
    threshold.py  the round's cost limit on its cost model's scale (pure functions of costs)
    report.py     rounds.json and its table
    sources.py    the embedded task or real data: everything that differs between the two
"""
