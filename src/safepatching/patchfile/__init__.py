"""The portable sparse patch file: export, apply, revert and inspect, bound to a base by fingerprint."""

from safepatching.patchfile.sparse import apply_patches, export_patch, inspect_patch, revert_patch

__all__ = ["apply_patches", "export_patch", "inspect_patch", "revert_patch"]
