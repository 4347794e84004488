{{/* Labels every object carries. */}}
{{- define "sluice.labels" -}}
app.kubernetes.io/name: sluice
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* An image reference: the component's own key (Antrea 1.15+) when its repository is set,
else `image` (Antrea 1.9); the tag defaults to the chart's appVersion. */}}
{{- define "sluice.image" -}}
{{- $own := index .root.Values .key -}}
{{- $image := ternary $own .root.Values.image (ne ($own.repository | default "") "") -}}
{{- printf "%s:%s" $image.repository ($image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "sluice.pullPolicy" -}}
{{- $own := index .root.Values .key -}}
{{- ternary $own.pullPolicy .root.Values.image.pullPolicy (ne ($own.repository | default "") "") -}}
{{- end -}}

{{/* NodeIPAM runs when enabled and its gate is not turned off (on by default, as in Antrea
since 1.12; Antrea 1.9 files set the gate explicitly). */}}
{{- define "sluice.nodeIPAM" -}}
{{- if and .Values.nodeIPAM.enable (ne (index .Values.featureGates "NodeIPAM") false) -}}true{{- end -}}
{{- end -}}

{{- define "sluice.serviceExternalIP" -}}
{{- if eq (index .Values.featureGates "ServiceExternalIP") true -}}true{{- end -}}
{{- end -}}

{{/* The cross-field checks the schema cannot express; each failure names the key. The binaries
validate the same again at start. */}}
{{- define "sluice.validate" -}}
{{- if ne .Values.datapath "ebpf" -}}
{{- fail (printf "datapath: %q is not available in this release; only \"ebpf\" is" .Values.datapath) -}}
{{- end -}}
{{- if not (has .Values.trafficEncapMode (list "encap" "noEncap")) -}}
{{- fail (printf "trafficEncapMode: %q is not implemented by Sluice; use \"encap\" or \"noEncap\"" .Values.trafficEncapMode) -}}
{{- end -}}
{{- if not (has .Values.tunnelType (list "geneve" "vxlan")) -}}
{{- fail (printf "tunnelType: %q is not implemented by Sluice; use \"geneve\" or \"vxlan\"" .Values.tunnelType) -}}
{{- end -}}
{{- if include "sluice.nodeIPAM" . -}}
{{- $ipam := .Values.nodeIPAM -}}
{{- if not $ipam.clusterCIDRs -}}
{{- fail "nodeIPAM.clusterCIDRs: NodeIPAM is enabled but no cluster CIDR is given" -}}
{{- end -}}
{{- $families := dict -}}
{{- range $cidr := $ipam.clusterCIDRs -}}
{{- $v6 := contains ":" $cidr -}}
{{- $family := ternary "IPv6" "IPv4" $v6 -}}
{{- if hasKey $families $family -}}
{{- fail (printf "nodeIPAM.clusterCIDRs: %v has two %s CIDRs; give at most one per family" $ipam.clusterCIDRs $family) -}}
{{- end -}}
{{- $_ := set $families $family true -}}
{{- $prefix := atoi (index (splitList "/" $cidr) 1) -}}
{{- $mask := int (ternary $ipam.nodeCIDRMaskSizeIPv6 $ipam.nodeCIDRMaskSizeIPv4 $v6) -}}
{{- $maskKey := ternary "nodeIPAM.nodeCIDRMaskSizeIPv6" "nodeIPAM.nodeCIDRMaskSizeIPv4" $v6 -}}
{{- if gt $prefix $mask -}}
{{- fail (printf "%s: %d is shorter than the mask of cluster CIDR %s; a node block must fit in it" $maskKey $mask $cidr) -}}
{{- end -}}
{{- if and $v6 (gt (sub $mask $prefix) 16) -}}
{{- fail (printf "%s: %d cuts more than 2^16 node blocks from %s; the difference to the cluster mask may be at most 16" $maskKey $mask $cidr) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Keys of the values that Sluice does not implement (Antrea's), comma-separated: the install
notes name them. */}}
{{- define "sluice.ignored" -}}
{{- $known := dict
  "datapath" (list) "image" (list) "agentImage" (list) "controllerImage" (list)
  "trafficEncapMode" (list) "tunnelType" (list) "defaultMTU" (list) "noSNAT" (list)
  "hostGateway" (list) "antreaProxy" (list "nodePortAddresses") "nodeIPAM" (list)
  "kubeAPIServerOverride" (list) "serviceCIDR" (list) "serviceCIDRv6" (list)
  "featureGates" (list "NodeIPAM" "ServiceExternalIP")
  "agent" (list "podAnnotations" "podLabels" "tolerations" "nodeSelector" "priorityClassName" "affinity" "updateStrategy" "healthPort" "bpfMapSizes" "hostCgroupRoot" "resources")
  "controller" (list "replicas" "podAnnotations" "podLabels" "tolerations" "nodeSelector" "priorityClassName" "affinity" "healthPort" "resources")
  "cni" (list "hostBinPath" "hostConfPath") -}}
{{- $nested := list "antreaProxy" "featureGates" "agent" "controller" "cni" -}}
{{- $ignored := list -}}
{{- range $key, $value := .Values -}}
{{- if not (hasKey $known $key) -}}
{{- $ignored = append $ignored $key -}}
{{- else if has $key $nested -}}
{{- range $sub, $_ := $value -}}
{{- if not (has $sub (index $known $key)) -}}
{{- $ignored = append $ignored (printf "%s.%s" $key $sub) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.serviceCIDRv6 -}}
{{- $ignored = append $ignored "serviceCIDRv6 (IPv6 Services are not implemented yet)" -}}
{{- end -}}
{{- join ", " $ignored -}}
{{- end -}}

{{/* The agent's config file (agent/src/config.rs). */}}
{{- define "sluice.agentConfig" -}}
datapath: {{ .Values.datapath }}
trafficEncapMode: {{ .Values.trafficEncapMode }}
tunnelType: {{ .Values.tunnelType }}
gatewayName: {{ .Values.hostGateway }}
{{- if .Values.defaultMTU }}
mtu: {{ .Values.defaultMTU }}
{{- end }}
masquerade: {{ not .Values.noSNAT }}
healthAddress: 0.0.0.0:{{ .Values.agent.healthPort }}
{{- with .Values.agent.bpfMapSizes }}
bpfMapSizes: {{ toJson . }}
{{- end }}
{{- with (.Values.serviceCIDR | default .Values.nodeIPAM.serviceCIDR) }}
serviceCIDR: {{ . }}
{{- end }}
nodePortAddresses: {{ .Values.antreaProxy.nodePortAddresses | default list | toJson }}
bpffsDir: /sys/fs/bpf/sluice
{{- if .Values.agent.hostCgroupRoot }}
cgroupDir: /host/cgroup
{{- end }}
stateDir: /var/lib/sluice
cniSocket: /var/run/sluice/cni.sock
featureGates:
  ServiceExternalIP: {{ include "sluice.serviceExternalIP" . | eq "true" }}
{{- end -}}

{{/* The controller's config file (agent/src/controller/config.rs). */}}
{{- define "sluice.controllerConfig" -}}
leaseName: sluice-controller
healthAddress: 0.0.0.0:{{ .Values.controller.healthPort }}
featureGates:
  NodeIPAM: {{ ne (index .Values.featureGates "NodeIPAM") false }}
  ServiceExternalIP: {{ include "sluice.serviceExternalIP" . | eq "true" }}
nodeIPAM:
  enableNodeIPAM: {{ .Values.nodeIPAM.enable }}
  clusterCIDRs: {{ .Values.nodeIPAM.clusterCIDRs | toJson }}
  serviceCIDR: {{ .Values.nodeIPAM.serviceCIDR | quote }}
  serviceCIDRv6: {{ .Values.nodeIPAM.serviceCIDRv6 | quote }}
  nodeCIDRMaskSizeIPv4: {{ .Values.nodeIPAM.nodeCIDRMaskSizeIPv4 }}
  nodeCIDRMaskSizeIPv6: {{ .Values.nodeIPAM.nodeCIDRMaskSizeIPv6 }}
{{- end -}}

{{- define "sluice.conflist" -}}
{
  "cniVersion": "1.0.0",
  "name": "sluice",
  "plugins": [
    {
      "type": "sluice-cni",
      "socket": "/var/run/sluice/cni.sock"
    }
  ]
}
{{- end -}}

{{/* The API server's address for pods that cannot use the in-cluster Service yet. */}}
{{- define "sluice.apiServerEnv" -}}
{{- with .Values.kubeAPIServerOverride }}
{{- $hostPort := (urlParse .).host }}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $hostPort) | default "443" }}
{{- $host := regexReplaceAll ":[0-9]+$" $hostPort "" | trimPrefix "[" | trimSuffix "]" }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ $host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $port | quote }}
{{- end }}
{{- end -}}
