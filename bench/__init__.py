"""acf-fast benchmark suite (issue 6).

Two ways to run it, both from the source tree:

* report: ``acf-fast bench`` or ``python -m bench`` runs a size sweep of every case
  side by side and writes ``bench/results/<device>-<date>.json``, a markdown table
  and PNG plots (``--quick`` for a sanity run under two minutes);
* pytest-benchmark: ``pytest bench/ --benchmark-json=out.json`` times the same
  cases at small sizes; the JSON's ``machine_info`` carries the device record.

Modules: ``flops`` (spec §8 operation counts), ``device`` (device record, energy),
``timing`` (medians, peak memory), ``workloads`` (seeded inputs), ``cases``
(similarity, re-ranker, metrics, training step, ceiling), ``report`` (the sweep),
``markdown``, ``plots``, ``readme`` (README "Performance" block).
"""
