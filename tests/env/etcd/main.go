// The etcd server of the test environment, built from the Go module proxy
// (tests/env/install-k8s.sh): etcd's own main, over the published server module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
