"""The Flowcept node daemon, installed as ``flowcept.daemon``."""

if __name__ == "daemon":  # pragma: no cover - guard against the folder being imported as top level
    raise ImportError("import the node daemon as 'flowcept.daemon', not 'daemon'")
