"""The Faust worker: the app, its consumer (the one module touching Faust/aiokafka internals), what of the
input may be applied when, the HTTP endpoints and the gauges."""
