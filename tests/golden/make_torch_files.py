"""Generate tests/golden/torch_files/: checkpoint files written by torch, and what they hold.

    pip install torch==2.13.0 safetensors && python tests/golden/make_torch_files.py

For each dtype (float32, float64, float16, bfloat16) one ``Model`` below, an embedding, every
recurrent module (a 2-layer bidirectional LSTM with ``proj_size``, a GRU, an RNN and the three
cells) and a linear layer, so a recurrent module's names carry a prefix (``lstm.weight_ih_l0``). Its
buffers add a transpose and an offset slice of other tensors' storage (views, strided and offset in
the file) and integer and bool tensors. Files:

- ``model_<dtype>.pt``: ``torch.save(model.state_dict(), path)``;
- ``model_<dtype>.safetensors``: ``safetensors.torch.save_file`` (views copied: safetensors has none);
- ``model_<dtype>.npz``: every state_dict entry (bfloat16 as its uint16 bits), ``torch_version``,
  and for float32 and float64 the input ``input.tokens`` and torch's outputs: ``output.<module>``
  (the output, or the cell's h), ``output.<module>.h_n``, and ``output.logits``, the model's
  ``linear(lstm(embedding(tokens)))``;
- ``legacy.pt`` (``_use_new_zipfile_serialization=False``, torch < 1.6's format) and ``module.pt``
  (a whole pickled ``nn.Module``): files jlstm refuses.
"""

import sys
from pathlib import Path

import numpy as np

TORCH_VERSION = "2.13.0"
OUT = Path(__file__).with_name("torch_files")
VOCAB, EMBED, HIDDEN, PROJ, CLASSES = 7, 3, 4, 2, 5


def make_model(torch, dtype):
    nn = torch.nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, EMBED)
            self.lstm = nn.LSTM(EMBED, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ)
            self.gru = nn.GRU(EMBED, HIDDEN)
            self.rnn = nn.RNN(EMBED, HIDDEN, nonlinearity="relu")
            self.lstm_cell = nn.LSTMCell(EMBED, HIDDEN)
            self.gru_cell = nn.GRUCell(EMBED, HIDDEN, bias=False)
            self.rnn_cell = nn.RNNCell(EMBED, HIDDEN)
            self.linear = nn.Linear(2 * PROJ, CLASSES)

        def forward(self, tokens):
            output, _ = self.lstm(self.embedding(tokens))
            return self.linear(output)

    model = Model().to(dtype)
    # Registered after the cast, which would copy them: views of the parameters' storage.
    model.register_buffer("linear_weight_t", model.linear.weight.data.t())
    model.register_buffer("embedding_window", model.embedding.weight.data[2:, 1:])
    model.register_buffer("steps", torch.arange(5))  # int64
    model.register_buffer("counts", torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32))
    model.register_buffer("shorts", torch.tensor([-(2**15), 7], dtype=torch.int16))
    model.register_buffer("chars", torch.tensor([-128, 0, 127], dtype=torch.int8))
    model.register_buffer("bytes", torch.tensor([0, 200, 255], dtype=torch.uint8))
    model.register_buffer("mask", torch.tensor([True, False, True]))
    return model


def outputs(torch, model, tokens) -> dict[str, np.ndarray]:
    x = model.embedding(tokens)
    out = {"input.tokens": tokens.numpy(), "output.logits": model(tokens)}
    for name in ("lstm", "gru", "rnn"):
        out[f"output.{name}"], h_n = getattr(model, name)(x)
        out[f"output.{name}.h_n"] = h_n[0] if name == "lstm" else h_n
    for name in ("lstm_cell", "gru_cell", "rnn_cell"):
        h = getattr(model, name)(x[0])
        out[f"output.{name}"] = h[0] if name == "lstm_cell" else h
    return {k: v if isinstance(v, np.ndarray) else v.detach().numpy() for k, v in out.items()}


def as_numpy(torch, tensor) -> np.ndarray:
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def main() -> None:
    import safetensors.torch
    import torch

    if torch.__version__.split("+")[0] != TORCH_VERSION:
        sys.exit(f"make_torch_files: needs torch=={TORCH_VERSION}, found {torch.__version__}")
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    tokens = torch.tensor([[1, 6], [0, 3], [5, 5], [2, 4]])  # (seq_len 4, batch 2)
    for name, dtype in [
        ("float32", torch.float32),
        ("float64", torch.float64),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ]:
        model = make_model(torch, dtype)
        state_dict = model.state_dict()
        torch.save(state_dict, OUT / f"model_{name}.pt")
        copies = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
        safetensors.torch.save_file(copies, OUT / f"model_{name}.safetensors")
        data = {k: as_numpy(torch, v) for k, v in state_dict.items()}
        data["torch_version"] = np.array(torch.__version__)
        if dtype in (torch.float32, torch.float64):
            with torch.no_grad():
                data |= outputs(torch, model, tokens)
        np.savez_compressed(OUT / f"model_{name}.npz", **data)
    small = torch.nn.GRU(2, 2)
    torch.save(small.state_dict(), OUT / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(small, OUT / "module.pt")
    for path in sorted(OUT.iterdir()):
        print(f"{path.stat().st_size:7d} {path}")


if __name__ == "__main__":
    main()
