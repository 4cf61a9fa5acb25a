"""A `gs://` bucket backed by a local directory, for testing bucket paths without network.

Like a real bucket it has no append: opening a `gs://` object with mode "a" fails.
"""

import contextlib
import os

from etils.epath.testing import mock_epath

_REDIRECTED = ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat",
               "glob")


@contextlib.contextmanager
def fake_bucket(root):
  def local(path):
    return os.fspath(path).replace("gs://", f"{root}/", 1)

  def redirect(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode="r", *args, **kwargs):
    if "a" in mode and os.fspath(path).startswith("gs://"):
      raise NotImplementedError(f"{path}: a bucket object cannot be appended to")
    return original(local(path), mode, *args, **kwargs)

  with mock_epath(open=open_, **{name: redirect for name in _REDIRECTED}):
    yield
