"""Workers: the processes that hold a pipeline and render units (`cogdist.worker.worker`).

Nothing is imported with the package: the driver's option checks import `cogdist.worker.cache`
without loading the worker itself.
"""
