"""The Flowcept launcher, installed as ``flowcept.launch``."""

if __name__ == "launch":  # pragma: no cover - guard against the folder being imported as top level
    raise ImportError("import the launcher as 'flowcept.launch', not 'launch'")
