"""``python -m preserve_onnx``: the same entry point as the ``preserve-onnx`` command."""

from preserve_onnx._entry import main

if __name__ == "__main__":
    main()
