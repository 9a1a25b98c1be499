"""Prepare what ``benchmarks/device_check.sh`` needs on a lent GPU machine, which reaches no network.

Run here, where pip works and the backbones are cached (``safepatching demo`` fetches the 0.5B one;
``safepatching fetch-model qwen2.5-coder-1.5b-instruct`` the other):

    python benchmarks/device_prepare.py [--image-packages FILE]

It writes ``.gpu/<backbone>/`` (each backbone's config and tokenizer files; the check builds random
weights from them; the tokenizer travels gzipped) and ``.whl/`` (wheels, for Python 3.12 on
x86-64, of this project's dependencies that the machine's image lacks, at the versions installed
here; lm-eval, which only the utility tasks import and the check skips, stays behind).
``--image-packages`` is a text file naming the image's packages (any separators); by default the
"Packages:" line of the device library's KINDS.md. transformers, accelerate and peft travel even when the image has them: their
versions decide what this project's code can call. Last line: the ``carry`` list for the run.
"""

from __future__ import annotations

import argparse
import gzip
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from safepatching.models.zoo import demo_model_dir

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ALWAYS_CARRIED = {"transformers", "accelerate", "peft"}
NEVER_CARRIED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")  # the image's CUDA build stays
LEFT_BEHIND = {"lm-eval"}  # nor what only it needs: 9 MiB the check does not use
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
CARRY_LIMIT = 48 << 20  # of the 64 MiB a call carries, room left for the working tree


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(root: str, left_behind: set[str]) -> dict[str, str]:
    """Every distribution ``root`` needs (extras left out, and ``left_behind`` with what only it
    needs), by canonical name, at its installed version."""
    found: dict[str, str] = {}
    pending = [root]
    while pending:
        name = canonical(pending.pop())
        if name in found or name in left_behind:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        found[name] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    found.pop(canonical(root))
    return found


def image_packages(path: Path) -> set[str]:
    text = path.read_text()
    if path.name == "KINDS.md":
        text = text[text.index("Packages:") :].splitlines()[0].removeprefix("Packages:")
    return {canonical(word.rstrip(".")) for word in re.split(r"[\s,]+", text) if word.rstrip(".")}


def download(name: str, version: str, target: Path) -> None:
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *platforms, "-d", str(target), f"{name}=={version}"]  # fmt: skip
    if subprocess.run(command).returncode:  # no wheel published (rouge-score): build one from the sdist
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(target), f"{name}=={version}"],
                       check=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-packages", type=Path, default=ROOT.parent / ".library" / "device" / "KINDS.md")
    args = parser.parse_args()
    for backbone in BACKBONES:
        source, shape = demo_model_dir(backbone), ROOT / ".gpu" / backbone
        missing = [name for name in SHAPE_FILES if not (source / name).is_file()]
        if missing:
            sys.exit(f"error: {source} lacks {', '.join(missing)}: fetch {backbone} first")
        shutil.rmtree(shape, ignore_errors=True)
        shape.mkdir(parents=True)
        for name in SHAPE_FILES:
            if name == "tokenizer.json":
                with (source / name).open("rb") as plain, gzip.open(shape / f"{name}.gz", "wb") as packed:
                    shutil.copyfileobj(plain, packed)
            else:
                shutil.copy(source / name, shape / name)
    present = image_packages(args.image_packages)
    carried = {
        name: version
        for name, version in dependency_closure("safepatching", LEFT_BEHIND).items()
        if not NEVER_CARRIED.match(name) and (name not in present or name in ALWAYS_CARRIED)
    }
    wheels = ROOT / ".whl"
    shutil.rmtree(wheels, ignore_errors=True)
    for name, version in sorted(carried.items()):
        download(name, version, wheels)
    size = sum(path.stat().st_size for path in [*(ROOT / ".gpu").rglob("*"), *wheels.iterdir()] if path.is_file())
    print(f"wheels: {', '.join(f'{n}=={v}' for n, v in sorted(carried.items()))}")
    print(f"carried size: {size / 2**20:.1f} MiB")
    if size > CARRY_LIMIT:
        sys.exit(f"error: {size / 2**20:.1f} MiB is more than the {CARRY_LIMIT >> 20} MiB a run can carry beside the tree")
    print('carry: [".whl", ".gpu"]')


if __name__ == "__main__":
    main()
