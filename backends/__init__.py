"""Storage backends and image formats of nbdserve, found through entry points."""
