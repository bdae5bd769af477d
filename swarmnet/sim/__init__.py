"""The population-model simulator (``swarmnet simulate``): PopSGD and SwarmSGD on up to 10^4+
simulated nodes with exact sequential semantics, batched into layers of disjoint pairs.

- :mod:`.problems`: the vectorized task protocol and the bundled tasks;
- :mod:`.draws`: the random inputs of each interaction, drawn in fixed blocks;
- :mod:`.layers`: scheduling interactions into layers of disjoint pairs;
- :mod:`.engine`: the runners (one pair at a time, or one layer at a time);
- :mod:`.runner`: :func:`run_simulation` (sweeps over node counts, curves, progress);
- :mod:`.output`: CSV / JSONL curves and the PNG plot;
- :mod:`.command`: the ``simulate`` CLI function;
- :mod:`.errors`: refused settings, named so the command can give their flags.
"""
