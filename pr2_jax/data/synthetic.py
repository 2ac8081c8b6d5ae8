"""A procedural sequence task for supervised next-token training.

Reverse-copy: `BOS d1 .. dn SEP dn .. d1 EOS`, digits drawn at random. The
first half is noise to the model, the second half is fully determined by it,
so the loss on the answer falls from ln(10) toward 0 as the model learns to
attend backwards; that makes it a quick check that the whole stack trains.

Dimension legend: B batch, N digits (n), T sequence length (2n + 3 tokens).
"""

from __future__ import annotations

import numpy as np

BOS, SEP, EOS = 1, 2, 3  # token 0 is unused: every batch has one length, nothing is padded
DIGIT0 = 4  # digits 0..9 are tokens 4..13
MIN_VOCAB = DIGIT0 + 10


def reverse_copy_batch(rng: np.random.Generator, batch: int, num_digits: int):
  """Returns dict(tokens int32 [B, T], loss_mask float32 [B, T]).

  `loss_mask[b, t] = 1` where token t is a target the model can predict (the
  reversed digits and EOS), so next-token loss uses `loss_mask[:, 1:]`.
  """
  if batch < 1 or num_digits < 1:
    raise ValueError(f"batch={batch} and num_digits={num_digits} must be >= 1")
  digits_BN = rng.integers(0, 10, size=(batch, num_digits)) + DIGIT0
  col = lambda v: np.full((batch, 1), v)
  tokens_BT = np.concatenate([col(BOS), digits_BN, col(SEP), digits_BN[:, ::-1], col(EOS)], axis=1)
  mask_BT = np.zeros(tokens_BT.shape, np.float32)
  mask_BT[:, num_digits + 2:] = 1.0
  return {"tokens": tokens_BT.astype(np.int32), "loss_mask": mask_BT}
