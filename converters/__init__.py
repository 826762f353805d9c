"""Model conversion and optimisation passes (host side only).

One pass a module (``convert``, ``prune``, ``quantize``, ``validate``, ``benchmark``, ``package``, ``sign``),
each registered by name in :mod:`converters.registry`; the format backends they call (``tflite_backend``,
``onnx_backend``, ``onnx_quantize``, ``onnx2tf_backend``, ``coreml_backend``, ``coreml_package``,
``prune_keras``, ``prune_onnx``) keep their heavy imports (tensorflow, onnx, coremltools) inside functions, so
importing this package is cheap. Nothing on the device imports this package.
"""
