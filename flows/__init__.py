"""Prefect wiring of medaug: one flow, `augment`, and its two deployments.

    flows/params.py   flow parameters (config YAML + overrides) -> PipelineConfig, one section per stage
    flows/tasks.py    tasks over pipeline/ and models/ (retries, content-hash caches, artifacts)
    flows/augment.py  the `augment` flow: ingest -> preprocess -> train (or load) -> generate -> gate -> dataset
    flows/deploy.py   `medaug serve`: the mri-ct and tumor-patches deployments of prefect.yaml in one process
    flows/demo.py     `medaug demo`: the flow in-process (Prefect's ephemeral mode) with a rich stage view
    flows/orphans.py  a watchdog that ends the demo's children (the ephemeral server) when the demo dies

Run it:

    medaug demo --out demo-output                      # in-process, no server
    prefect server start                               # or: a local server ...
    medaug serve                                       # ... serving both deployments
    prefect deployment run augment/mri-ct --param config=configs/tiny.yaml --param out=/tmp/run

Scale-out. `runtime.task_runner: dask` runs the parallel stages (ingest of the training
sources and the DICOM trees side by side; generation) on prefect-dask's DaskTaskRunner: a
LocalCluster of `runtime.max_workers` workers, or the scheduler at `runtime.dask_address`.
`runtime.nproc_per_node: N` (N > 1) runs the training stage as a subprocess

    torchrun --standalone --nproc_per_node N -m medaug.cli train cyclegan --data OUT/ingest \\
        --out RUN_DIR --config RUN_DIR/config.yaml --device cuda [--resume]

(`train tumor-gan --data OUT/patches ...` for the tumor GAN), one process per GPU of the
machine that runs the flow; the trainer splits batches across ranks and rank 0 writes the
checkpoints. From a deployment:

    prefect deployment run augment/mri-ct --params \\
        '{"overrides": ["runtime.nproc_per_node=4", "runtime.device=cuda"]}'
"""
