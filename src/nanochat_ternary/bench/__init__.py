"""``nanochat-train bench``: matched comparison of training configurations, with its noise shown.

Every configuration of a suite trains the same model on the same data for the same steps and batch
shape, with the same seeds; only what the configuration's TOML changes (optimizer variant, MTP,
Collider, async loading, gradient checkpointing) differs. Each (configuration, seed) runs in a fresh
process, one at a time (:mod:`.runner`, :mod:`.worker`); :mod:`.report` aggregates over seeds, says
which differences exceed the seed-to-seed spread, and writes ``REPORT.md``, ``results.json``,
``loss.png`` and ``memory.png``. :mod:`.peers` adds other libraries' optimizers on the same task.
"""
