"""LSTM language model: config checks, state carrying, tying, loss, training sanity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aigc.config import ConfigError, from_dict
from aigc.errors import AigcError
from aigc.models import build_model
from aigc.models.lstm import LSTMLM, LSTMConfig

V = 23


def tiny(**kw) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig(**{"vocab_size": V, "n_embd": 16, "n_hidden": 24, "n_layer": 2, **kw})).eval()


@pytest.mark.parametrize("kw", [dict(n_layer=0), dict(dropout=1.5), dict(n_hidden=0), dict(vocab_size=-3)])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ConfigError):
        from_dict(LSTMConfig, kw)


def test_vocab_zero_refused_when_building():
    with pytest.raises(AigcError, match="vocab_size is 0"):
        build_model("lstm", {})


def test_forward_loss_and_ignore_index():
    m = tiny()
    idx, targets = torch.randint(0, V, (3, 9)), torch.randint(0, V, (3, 9))
    targets[0] = -1
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 9, V)
    torch.testing.assert_close(loss, F.cross_entropy(logits[1:].reshape(-1, V), targets[1:].reshape(-1)))
    assert m(idx)[1] is None


def test_state_carrying_equals_one_pass():
    m = tiny()
    idx = torch.randint(0, V, (2, 12))
    full, state_full = m.forward_state(idx)
    parts, state = [], m.init_state(2)
    for t in range(12):  # one token at a time, as generation does
        logits, state = m.forward_state(idx[:, t : t + 1], state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[0], state_full[0], atol=1e-5, rtol=1e-5)
    assert state[0].shape == (2, 2, 24)  # (L, B, H)
    # forward(state=...) continues from a carried state too
    torch.testing.assert_close(
        m(idx[:, 6:], state=m.forward_state(idx[:, :6])[1])[0], full[:, 6:], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("n_hidden, has_proj", [(16, False), (24, True)])
def test_tying_with_and_without_projection(n_hidden, has_proj):
    m = tiny(tie_embeddings=True, n_hidden=n_hidden)
    assert m.lm_head.weight is m.tok_emb.weight
    assert (m.proj is not None) == has_proj
    untied = tiny(tie_embeddings=False, n_hidden=n_hidden)
    assert m.num_params() < untied.num_params()
    assert m(torch.zeros(1, 3, dtype=torch.long))[0].shape == (1, 3, V)


def test_num_params_and_flops():
    m = tiny()
    E, H = 16, 24
    lstm = 4 * H * (E + H) + 4 * H * (H + H)  # weights of the two layers
    biases = 2 * 4 * H * 2
    assert m.num_params() == V * E + lstm + biases + H * V + V
    assert m.flops_per_token() == 6 * (lstm + H * V)


def test_learns_a_repeating_sequence():
    m = tiny(n_layer=1).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    seq = torch.arange(25) % 4
    x, y = seq[None, :-1].repeat(4, 1), seq[None, 1:].repeat(4, 1)
    losses = []
    for _ in range(60):
        _, loss = m(x, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 2.5 and losses[-1] < 0.1
