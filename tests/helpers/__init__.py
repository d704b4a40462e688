"""Helpers the test modules share (fixtures stay in ``tests/conftest.py``).

* :mod:`helpers.models` — tiny random GPTs and their configs;
* :mod:`helpers.net` — a free loopback port (a server's, a process group's);
* :mod:`helpers.distributed` — gloo process groups on this machine: one rank's group, spawning the
  ranks and reading back what each saved;
* :mod:`helpers.optim` — optimizer test data and loops: seeded parameters and gradient streams,
  stepping an optimizer through them, planted-spectrum matrices, a state-dict round trip.

Import them as ``from helpers.models import tiny_model`` (``tests/`` is on ``sys.path`` under pytest).
"""
