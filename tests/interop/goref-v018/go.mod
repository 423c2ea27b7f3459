module estargz-tests/goref-estargz-v018

go 1.24.0

require (
	github.com/containerd/stargz-snapshotter/estargz v0.18.2
	github.com/opencontainers/go-digest v1.0.0
)

require (
	github.com/klauspost/compress v1.18.3 // indirect
	github.com/vbatts/tar-split v0.12.2 // indirect
	golang.org/x/sync v0.19.0 // indirect
)
