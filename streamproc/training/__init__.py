"""The global models' trainer (one group member learns the training topic) and the whole pipeline in one process
(``streamproc models train``, benchmarks), both through ``pipeline.factory``."""
