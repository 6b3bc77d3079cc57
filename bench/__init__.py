"""The benchmarks, run as ``python -m bench`` (``make bench``); results in bench/latest.json.

Every section measures through the library's own experiment functions
(:mod:`lance_lib.experiments.latency`, :mod:`lance_lib.experiments.region_memory`,
:mod:`lance_lib.experiments.finetune`), on the models prepared by
:mod:`lance_lib.experiments.setup` from the reference weights: the benchmark measures what
the figures plot, by the same code.

==========  ==========================================================================
``steps``   sections ``methods`` (every method on one batch at the paper's Table 2
            setting, ratios to LANCE and BP, the ranks LANCE found) and ``fig5`` (the
            Fig. 5 latency sweep over 1..L trained layers)
``region``  section ``region``: what the whole trainable region keeps, BP / LANCE / lean
``gpu``     section ``gpu``: the paper profile's code path on CUDA and the peak GPU
            memory of BP, LANCE and lean LANCE (skipped, saying so, without CUDA)
``sections``  the section registry
==========  ==========================================================================
"""
