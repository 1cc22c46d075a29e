"""jlstm: PyTorch-exact LSTM / GRU / RNN layers and cells as pure, jit-compiled JAX functions."""

from jlstm.cells import gru_cell as gru_cell
from jlstm.cells import lstm_cell as lstm_cell
from jlstm.cells import rnn_cell as rnn_cell
from jlstm.layers import gru as gru
from jlstm.layers import lstm as lstm
from jlstm.layers import pad_sequence as pad_sequence
from jlstm.layers import rnn as rnn
from jlstm.params import init_gru as init_gru
from jlstm.params import init_gru_cell as init_gru_cell
from jlstm.params import init_lstm as init_lstm
from jlstm.params import init_lstm_cell as init_lstm_cell
from jlstm.params import init_rnn as init_rnn
from jlstm.params import init_rnn_cell as init_rnn_cell
from jlstm.torch_files import load_torch as load_torch
from jlstm.torch_files import load_torch_state_dict as load_torch_state_dict
from jlstm.torch_files import save_torch as save_torch
from jlstm.torch_files import save_torch_state_dict as save_torch_state_dict
from jlstm.torch_io import from_torch as from_torch
from jlstm.torch_io import to_torch as to_torch

__version__ = "0.1.0"
