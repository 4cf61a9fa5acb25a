"""The README's main job: sampling from the embedded model, sharded, with an HF round trip."""

from jrlhf import sample


def test_sample_embedded_model_round_trip(tmp_path, capsys):
  sample.main(["--save", str(tmp_path / "ckpt"), "--mesh", "2,-1,2", "--max-new-tokens", "8",
               "--prompt", "hi", "--prompt", "abc", "--prompt", "x"])
  out = capsys.readouterr().out
  assert (tmp_path / "ckpt" / "config.json").exists()
  assert "'hi' -> " in out and "'x' -> " in out
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out


def test_left_pad_rounds_batch_up():
  tokens, mask = sample.left_pad([[5, 6, 7], [9]], pad_id=0, multiple=4)
  assert tokens.shape == (4, 3)
  assert tokens[1].tolist() == [0, 0, 9] and mask[1].tolist() == [0, 0, 1]
  assert tokens[3].tolist() == [5, 6, 7]
