"""The transformers side of the peer benchmark (`experiments/bench_peer.py`): Qwen3-MoE in eager
PyTorch, loaded from the checkpoint bench_peer writes from our initialised weights.

`Torch` runs what bench_peer times against our model: a train step (forward, backward, clip
1.0, AdamW) and greedy decoding with a KV cache of exactly N new tokens, plus the untimed
forward pass of the parity check. It is its own module because bench_peer.py had reached the
400-line limit; it defines no flags (`s` is bench_peer's settings dict, of which it reads `lr`
and `new_tokens`), and imports torch and transformers only when a `Torch` is built.

Dimension legend:
  B sequences (the train batch, or the decode batch for the prompts), T train tokens per
  sequence, P prompt tokens, N new tokens per sequence.
"""


class Torch:
  """transformers' Qwen3MoeForCausalLM from our checkpoint, eager PyTorch, its default kernels."""

  def __init__(self, path, s, tokens_BT, prompts_BP):
    import torch
    import transformers
    self.torch = torch
    load = lambda: transformers.Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32)
    self.model, self.decoder = load().train(), load().eval()  # decode from the initial weights
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=s["lr"], betas=(0.9, 0.999),
                                 eps=1e-8, weight_decay=0.0)
    self.tokens, self.prompts = (torch.tensor(a, dtype=torch.long) for a in (tokens_BT, prompts_BP))
    self.new_tokens = s["new_tokens"]
    self.impl = {"experts": self.model.config._experts_implementation,
                 "attention": self.model.config._attn_implementation}
    self.losses = []

  def train(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(self.tokens, labels=self.tokens).loss  # shifted mean CE, as ours
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.losses.append(float(loss.detach()))

  def decode(self):
    with self.torch.no_grad():
      out = self.decoder.generate(
          self.prompts, attention_mask=self.torch.ones_like(self.prompts), do_sample=False,
          use_cache=True, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
          eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == self.prompts.shape[1] + self.new_tokens, out.shape
    self.decoded = out.numpy()  # not self.tokens: the train batch

  def forward(self):
    with self.torch.no_grad():
      out = self.decoder(self.tokens, labels=self.tokens)
    return float(out.loss), out.logits.numpy()


if __name__ == "__main__":  # run as a command, it would do nothing at all, even for --help
  import sys
  sys.stderr.write("error: experiments.peer_torch is a library module, not a command; it is "
                   "used by python -m experiments.bench_peer\n")
  sys.exit(2)
