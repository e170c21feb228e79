"""The conversion pipeline: four stages as plain functions (no Celery), and the local runner.

Stages (inputs and outputs are JSON-serialisable; each result has to_dict()/from_dict()):

* `plan.resolve_image(repo, ref, platforms) -> ImagePlan` — root descriptor, every manifest (with
  its config, layers, diff_ids, chain ids) and index (children first); attestations dropped.
* `prepare.prepare_layer(repo, layer_descriptor, spool_dir, *, native, turbo, algorithm="lz4",
  block_size=4096, progress=None, entry_stream=None) -> PreparedLayer` — one streaming pass per
  source layer into a spool keyed by the layer digest (+ algorithm/bs), on every core of the process
  (`fanout`); reused when present. `entrystream` hands its entries to a metadata pass as it scans.
* `metadata.build_metadata(prepared_layers, vsize_gb, chain_ids, workdir, parents=None)
  -> list[AppliedLayer]` — ext4 metadata of every layer, in order, in one process (`MetadataPass`
  applies a layer whole or, `apply_parts`, part by part while it is prepared);
  `encode_metadata`/`decode_metadata` move an AppliedLayer between processes as bytes.
* `assemble.assemble_layer(prepared, metadata, profile, chain_id, parent_chain_id, target_repo,
  upload=True, *, oci=False, source_repo=None) -> ConvertedLayer` — native or turbo blob, streamed
  into `target_repo.upload_blob`.
* `push.push_manifest(target_repo, *, source_manifest, source_config, source_desc, fmt, layers,
  diff_ids, oci, referrer, ref, upload=True, dump_dir=None) -> PushedManifest` and
  `push.push_index(target_repo, *, source_index, source_desc, children, fmt, oci, referrer, ref,
  upload=True, dump_path=None) -> descriptor`.
* `parents.read_back_parents(repo, fmt, layer_digests, source_layer_digests, scratch)` — converted
  layers as the block device a mid-chain metadata pass starts from.

Runner: `runner.convert(request, *, options=None, progress=None) -> ConversionResult`
(`validate.validate_request(request)` checks flags without importing the heavy modules);
`results` holds what it reports (`ProgressEvent`, `ConversionResult`) and `RunnerOptions`, `pool`
the stage functions its worker processes run, `forkserver` starts their fork server early.
"""
