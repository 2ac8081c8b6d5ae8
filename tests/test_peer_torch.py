"""experiments/peer_torch.py: the transformers side of the peer benchmark, on a tiny random
Qwen3-MoE checkpoint.

What bench_peer relies on when it compares the two sides: the parity forward pass and the first
train step see the same weights and compute the same shifted mean cross-entropy; decoding starts
from the initial weights whatever the train steps did; a decode is greedy, exactly N new tokens
after the prompts. (That both sides agree with each other: tests/test_bench_peer.py.) And run
as a command, the module says it is a library.
"""

import numpy as np
import pytest
import torch
import transformers

from experiments.peer_torch import Torch

import _cli

B, T, P, N, V = 2, 12, 5, 4, 64


@pytest.fixture
def one_thread():
  """jax and torch share the 2 CPU cores (tests/test_hf_checkpoint.py): torch on one thread."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture
def peer(tmp_path, one_thread):
  torch.manual_seed(0)
  config = transformers.Qwen3MoeConfig(
      vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, head_dim=8,
      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
      moe_intermediate_size=16, max_position_embeddings=64, initializer_range=0.1)
  transformers.Qwen3MoeForCausalLM(config).save_pretrained(str(tmp_path))
  rng = np.random.default_rng(0)
  tokens_BT = rng.integers(0, V, (B, T)).astype(np.int32)
  prompts_BP = rng.integers(0, V, (B, P)).astype(np.int32)
  return Torch(str(tmp_path), {"lr": 1e-2, "new_tokens": N}, tokens_BT, prompts_BP)


def test_forward_is_the_shifted_mean_cross_entropy(peer):
  loss, logits_BTV = peer.forward()
  assert logits_BTV.shape == (B, T, V)
  tokens_BT = peer.tokens.numpy()
  shifted = logits_BTV[:, :-1] - logits_BTV[:, :-1].max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  target = np.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)
  assert loss == pytest.approx(-target.mean(), rel=1e-5)


def test_train_steps_move_the_train_model_only(peer):
  before, _ = peer.forward()
  peer.train()
  peer.train()
  assert len(peer.losses) == 2 and all(np.isfinite(peer.losses))
  assert peer.losses[0] == pytest.approx(before, rel=1e-5)  # the same weights before any step
  assert peer.losses[1] != pytest.approx(peer.losses[0])    # the step changed the weights
  assert peer.forward()[0] == before  # the decoder keeps the initial weights
  assert set(peer.impl) == {"experts", "attention"} and peer.impl["attention"]


def test_decode_is_greedy_and_exactly_n_new_tokens(peer):
  peer.decode()
  assert peer.decoded.shape == (B, P + N)
  np.testing.assert_array_equal(peer.decoded[:, :P], peer.prompts.numpy())
  with torch.no_grad():  # the first new token: the argmax after the prompt
    logits_BPV = peer.decoder(peer.prompts).logits.numpy()
  np.testing.assert_array_equal(peer.decoded[:, P], logits_BPV[:, -1].argmax(-1))


def test_run_as_a_command_it_says_it_is_a_library():
  _cli.says_it_is_a_library("experiments.peer_torch", "experiments.bench_peer")


def test_train_steps_are_clipped_adamw_by_hand(peer, tmp_path):
  """Two steps of the train model against AdamW written out here on a fresh copy of the
  checkpoint: global-norm clip 1.0 (the gradients' norm is above it), betas (0.9, 0.999),
  eps 1e-8, no weight decay, lr 1e-2: the settings of our make_optimizer, which bench_peer
  compares against. The second step is where the betas show (the first is ~lr * sign(g))."""
  ref = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  ref.train()
  params = list(ref.parameters())
  moments = [(torch.zeros_like(p), torch.zeros_like(p), [0]) for p in params]
  b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
  norms = []
  for _ in range(2):
    ref.zero_grad(set_to_none=True)
    ref(peer.tokens, labels=peer.tokens).loss.backward()
    live = [(p, mv) for p, mv in zip(params, moments) if p.grad is not None]
    norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p, _ in live)))
    norms.append(norm)
    scale = min(1.0, 1.0 / (norm + 1e-6))
    with torch.no_grad():
      for p, (m, v, step) in live:
        g = p.grad * scale
        step[0] += 1
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        m_hat, v_hat = m / (1 - b1 ** step[0]), v / (1 - b2 ** step[0])
        p -= lr * m_hat / (v_hat.sqrt() + eps)
    peer.train()
  assert min(norms) > 1.0  # the clip is active: a wrong threshold would show
  for (name, got), want in zip(peer.model.named_parameters(), params):
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-4,
                               atol=1e-6, err_msg=name)


def test_decode_after_train_steps_is_greedy_on_the_initial_weights(peer, tmp_path):
  """bench_peer decodes after its timed train steps: every new token is the argmax of a fresh
  load of the checkpoint given the tokens before it (one forward over the decoded rows), not of
  the weights the steps moved."""
  for _ in range(3):
    peer.train()
  peer.decode()
  fresh = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  with torch.no_grad():
    logits_BSV = fresh.eval()(torch.tensor(peer.decoded)).logits.numpy()
  np.testing.assert_array_equal(peer.decoded[:, P:], logits_BSV[:, P - 1:-1].argmax(-1))
