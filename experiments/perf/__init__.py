"""Performance tools, each backing a figure in BENCHMARKS.md or README (its first docstring line
says which, and the command). They time jlstm through its public API on experiments.bench's cases:

- ``knobs``: in-process A/B of public options (``checkpoint_every``, ``impl``), fwd and train.
- ``backward_batch``: the C++ loop's two ways to end a backward, by batch and hidden size.
- ``accumulation_rows``: how many gate-gradient rows the in-loop backward adds into the weight
  gradients per pass.
- ``saved_gates``: gate gradients written over the saved gates, or into a buffer of their own.
- ``step_faults``: a step's wall, user and system time and its page faults, alone or each after
  torch's step of the same case.
- ``train_parts``: a train step's forward, saving forward and backward apart; XLA's GEMMs of
  the wide backward next to ``torch.mm``.
- ``tiles.cc`` (C++, built by hand, see its header): the C++ loop's register tiles and B prefetch
  on one core, GFLOP/s by step shape.
- ``flags``: jlstm's CPU time under process-wide settings (``XLA_FLAGS``, ``JLSTM_NATIVE_THREADS``).
- ``concurrency``: whether XLA CPU runs a large GEMM, and a loop body's independent dots, on all
  cores.
- ``cpu_devices``: one virtual CPU device per core, the batch split with ``shard_map``.
- ``profile_case``: one case's jitted step in a loop, for ``perf record``.
- ``triton_cubin``: the Pallas kernels compiled to sm_90 machine code; registers and shared memory.
- ``probe_settle``: ``make bench``'s speed probe right after each implementation of a case, with
  and without a pause first.
- ``order_effect``: each implementation's time right after each other one, and settled.
"""
