"""The SafePatching method: objectives, derivation, dense patches, SNIP importance, regions and merging."""
