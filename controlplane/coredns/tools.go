//go:build tools

// CoreDNS for the end-to-end test node (cluster DNS: kubernetes plugin), pinned by go.mod here;
// built by ../../Makefile, target node. A separate module so its client-go does not move the
// k8s.io pins of ../go.mod.
package coredns

import (
	_ "github.com/coredns/coredns"
)
