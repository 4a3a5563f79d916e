"""The UI's file access: only the outputs folder, the shipped data and folders named at launch; checked uploads."""
import os

import pytest
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.ui.safety import Sandbox, check_upload


def test_paths_inside_the_outputs_folder_resolve(sandbox):
    (sandbox.outputs / "run").mkdir()
    assert sandbox.resolve("run", "folder", kind="dir") == sandbox.outputs / "run"
    assert sandbox.resolve(str(sandbox.outputs / "run"), "folder", kind="dir") == sandbox.outputs / "run"


@pytest.mark.parametrize("text", ["../secret", "run/../../etc", "..", "a/..\\b", "..\\x"])
def test_traversal_is_refused(sandbox, text):
    with pytest.raises(SdtuneError, match=r"'\.\.' is not allowed"):
        sandbox.resolve(text, "image folder")


def test_absolute_paths_outside_the_roots_are_refused(sandbox, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    for text in ("/etc", "/etc/passwd", str(tmp_path / "elsewhere"), "~"):
        with pytest.raises(SdtuneError, match="outside the folders the UI may use"):
            sandbox.resolve(text, "image folder")


def test_a_symlink_out_of_the_outputs_folder_is_refused(sandbox, tmp_path):
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", sandbox.outputs / "link")
    with pytest.raises(SdtuneError, match="outside"):
        sandbox.resolve("link", "image folder")


def test_folders_named_at_launch_are_readable_not_writable(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    sb = Sandbox(tmp_path / "out", [photos])
    assert sb.resolve(str(photos), "image folder", kind="dir") == photos.resolve()
    with pytest.raises(SdtuneError, match="outside the folders"):
        sb.resolve(str(photos), "class_dir", write=True)
    with pytest.raises(SdtuneError, match="not a folder"):
        Sandbox(tmp_path / "out", [tmp_path / "missing"])


def test_nul_bytes_and_empty_paths_are_refused(sandbox):
    with pytest.raises(SdtuneError, match="NUL"):
        sandbox.resolve("a\x00b", "model")
    with pytest.raises(SdtuneError, match="empty path"):
        sandbox.resolve("  ", "model")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a b", "/abs"])
def test_run_names_are_plain_folder_names(sandbox, name):
    with pytest.raises(SdtuneError, match="run name"):
        sandbox.run_dir(name)


def test_uploads_must_be_images_of_a_limited_size(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(good)
    assert check_upload(good).size == (16, 16)
    fake = tmp_path / "fake.png"
    fake.write_text("<script>alert(1)</script>")
    with pytest.raises(SdtuneError, match="is not an image"):
        check_upload(fake, "training image")
    with pytest.raises(SdtuneError, match="the limit is 0 MB"):
        check_upload(good, "upload", max_bytes=10)
    pdf = tmp_path / "doc.png"
    pdf.write_bytes(b"%PDF-1.4\n" + b"0" * 100)
    with pytest.raises(SdtuneError, match="is not an image"):
        check_upload(pdf)
