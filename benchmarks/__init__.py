"""The rnnserve benchmark suite: ``python -m benchmarks.run`` (or ``make bench``).

``inprocess`` measures the limit (onnxruntime alone), ``loadgen`` drives a real server from
separate processes over raw WebSocket / HTTP/1.1 connections, ``memory`` measures resident
memory of idle sessions and start-up time, and ``run`` ties it together into one table.
"""
