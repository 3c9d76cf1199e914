//go:build tools

// Kubeflow Trainer v2's controller manager and the JobSet controller, at the JobSet version Trainer's own go.mod
// requires. One module, so both build against the same selected dependency versions; `go build` them from here
// (see ../../Makefile, target trainer).
package trainer

import (
	_ "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager"
	_ "sigs.k8s.io/jobset"
)
