"""GPU workers: load a diffusers pipeline, take jobs from the broker, send images back.

``gpu_worker.models`` is plain data and imports no torch; everything else here may.
"""
