"""Benchmarks of dicom-spanner: fan-out latency, merge rate, throughput, and real Orthanc archives.

Run each as ``python -m benchmarks.NAME`` (``--quick`` for a short run); results land in
benchmarks/results/ as JSON, markdown and PNG.
"""
