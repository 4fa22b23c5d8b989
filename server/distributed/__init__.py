"""Scale-out on Ray Serve (`pip install .[ray]`): the same engine and scheduler in every replica.

  app.py           the Ray Serve application (`serve run server.distributed.app:build_app`)
  ingress.py       HTTP edge: forwards every request to a replica, by task id where it runs a prefix
  replica.py       one replica: the single-server app; Ray's multiplexing holds tasks (LRU)
  asgi.py          runs a forwarded request through the app in-process, streaming the reply back

The replicas' prefix store: server/registry/shared_store.py (a folder every replica reads and writes,
no Ray needed) or, with prefix_store=s3://..., server/registry/s3_store.py (an object store).

See docs/scaling.md.
"""

BASE_MODEL_ID = "__base__"  # the multiplexed id of requests that name no task (the base model)
