"""Benchmark jlstm against torch.nn.LSTM/GRU, flax.linen.RNN and, on GPU, jax.experimental.rnn.

    make bench                                  # every case and mode + the MNIST epoch
    make bench-quick                            # about one minute: small cases, 3 samples
    python -m experiments.bench --cases mnist,long --modes train --samples 5 --no-epoch

Every implementation gets the same weights (torch's ``state_dict``, converted with
``jlstm.from_torch`` and into flax's parameter tree) and must agree with torch, outputs and
gradients, before it is timed. Timing is round-robin in one process: each sample runs every
implementation once for a few iterations, in an order that changes from sample to sample; a case
reports the median over samples of the time per iteration, and ratios to torch measured side by
side. JAX compile time (trace + lower + compile) is measured apart. "fwd" is the forward pass
(torch under ``inference_mode``); "train" is forward + backward of ``sum(output * cotangent)``,
gradients with respect to the parameters and the input. Results print as a markdown table and go
to ``runs/bench/bench.json``. Each measurement records the machine's 1-minute load before and
after it and the cores other processes kept busy meanwhile; one taken while they kept more than a
quarter of the cores busy is marked ``*`` (``"loaded": true``); one whose GEMM probe, timed in
every sample, ran below 0.9 of the run's fastest is marked ``~`` (``"slow": true``). A marked
measurement is taken again, up to ``--retries`` times, keeping the try the machine ran fastest in.
On CPU the run first measures the machine's float32 GEMM peak (torch, XLA and numpy;
``--no-peak`` skips it) and holds each case against it.

The package: ``cases`` (the one table of benchmark cases), ``adapters`` (torch, jlstm, flax and
cuDNN on the same weights), ``timing`` (comparison with torch, round-robin timing), ``memory``
(train-step peak memory), ``epoch`` (a whole MNIST epoch), ``machine`` (CPU, versions, load),
``peak`` (the GEMM peak and the targets), ``report`` (tables), ``cli`` (flags; each case checked,
then timed; the run).
"""
