"""`loraplex cluster`: engine replicas as a Ray Serve deployment behind one OpenAI ingress.

Each replica runs the whole `loraplex serve` app (routes, schemas, keys, limits, errors) around its
own engine; the ingress forwards each HTTP request to one replica, choosing it by the adapter the
request names (Ray Serve's multiplexed model id), and fans admin calls, /metrics and /health out to
every replica. Needs the optional extra `loraplex[cluster]` (ray[serve]).
"""
