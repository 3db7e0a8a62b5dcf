// Package s3 is a driver.Storage for objects in an S3-compatible object
// store (AWS S3, MinIO, Ceph RGW, versitygw): names "s3://BUCKET/KEY",
// registered as the scheme "s3" from init.
//
// Configuration is what every S3 tool reads: AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (or
// AWS_DEFAULT_REGION), AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (a custom
// endpoint is addressed path-style; plain http:// only to a loopback
// address unless insecure=on), and the AWS_PROFILE section of
// ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE). driver.SchemeEnv.Options
// override them (see Options). Every connection is dialled through
// SchemeEnv.Dialer.
//
// Facts about S3 this package relies on:
//   - Objects are immutable: a PUT or a completed multipart upload replaces
//     the whole object, atomically; there is no partial write. So a file
//     opened for writing is always a new object, made visible only when the
//     File is closed.
//   - An ETag names one version of an object's content; a GET with
//     If-Match fails with 412 Precondition Failed once the object has been
//     replaced, which is how a reader that pinned the ETag at open never
//     mixes two versions.
//   - Ranged GETs ("Range: bytes=a-b") read any byte range.
//   - A multipart upload has parts numbered 1..10000, uploaded in any
//     order and re-uploadable until completed; every part but the last
//     must be at least 5 MiB. Until CompleteMultipartUpload the parts are
//     invisible (and unreadable), and AbortMultipartUpload deletes them.
//   - There are no holes: a raw object reads as data everywhere, so files
//     here do not implement driver.HoleSeeker.
//
// Reading (Open with driver.ReadOnly): the size and ETag are pinned by a
// HEAD at open; ReadAt fetches aligned blocks (block-size, default 1 MiB)
// with ranged GETs carrying If-Match, in parallel for large reads, into a
// small LRU of blocks (cache-blocks) with read-ahead after sequential reads
// of a reader with one request at a time (read-ahead blocks; readers
// whose requests overlap keep GETs in flight themselves). Blocks a read
// covers whole that are neither cached nor being fetched are read straight
// into the caller's buffer, a run of them by one GET of up to 4 MiB: no
// copy, and they do not push other blocks out of the LRU. Failed requests
// are retried with backoff (retries; internal/backoff).
//
// Writing (Open with driver.ReadWrite and driver.Create or
// driver.Truncate; over an existing object, which is replaced whole when
// the new one is complete and left as it was if the upload fails): the
// object is cut into parts of part-size bytes
// (default 8 MiB; the size doubles every 1000 parts, so an object of
// unknown size reaches terabytes within S3's 10000 parts; a Truncate before
// the first write, as raw and fixed VHD do, picks equal parts that fit the
// size instead). A part stays in memory while it is being written; when
// more than mem-parts parts are held, the lowest one is uploaded if every
// byte of it was written, else it is spilled to a local temporary file
// (with spill=all it always is, so any write pattern works; a part with
// unwritten bytes is likely to be filled later: a qcow2 L2 table reserved
// while compressed clusters stream past it, a raw hole, a VHD footer
// written first). The first part is held until Close because image
// writers rewrite their header last. Close uploads what is left (zero parts
// for ranges never written) and completes the upload; on any failure the
// upload is aborted, so neither a partial object nor orphaned parts remain.
// A rewrite of bytes already uploaded is refused with a clear error (no
// writer of raw, qcow2 -c or in order, VMDK streamOptimized, VHD fixed or
// DMG does that). Memory is bounded by (mem-parts + 2) part buffers: two
// parts upload at once, sent as they are. Each part's payload is checked
// by the server: over https and to a loopback endpoint by its CRC-32C
// (x-amz-checksum-crc32c, payload UNSIGNED-PAYLOAD: the CPU cost of a
// hardware CRC instead of SHA-256), over plain http to another host
// (insecure=on) by its signed SHA-256. ReadAt reads back what is held in memory or spilled; Sync only
// reports a failed upload, as the object exists only once closed.
//
// Each Storage has its own HTTP client; CloseStorage (driver.StorageCloser,
// called by vdisk when the last image it opened on the storage closes)
// closes the client's idle connections.
package s3
