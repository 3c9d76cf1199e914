module dcv2k8s/pause

go 1.26
