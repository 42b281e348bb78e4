"""Helpers of the bimcv-fetch benchmark harness (``benchmarks/run.py``).

- :mod:`.measure`: run one command, timed, with its CPU time and peak RSS (``os.wait4``);
  paired, alternating runs of a bench row and their statistics.
- :mod:`.sample`: the cached sample releases (size → ``size_scale``, built once).
- :mod:`.servers`: the project's share server and nginx on loopback.
- :mod:`.benches`: the bench rows (bimcv-fetch against its anchors) and their targets.
- :mod:`.machine`: the machine description recorded with the results.
- :mod:`.report`: ``results/*.json`` and ``results/*.md``.
"""
