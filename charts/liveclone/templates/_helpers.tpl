{{/*
The CSI driver's name. Fixed: PersistentVolumes record it, so renaming it
would orphan every existing volume.
*/}}
{{- define "liveclone.driverName" -}}
csi.liveclone.io
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "liveclone.labels" -}}
app.kubernetes.io/name: liveclone
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The selector of one component's pods: call with (list $ "node"). */}}
{{- define "liveclone.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: liveclone
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The driver's image; the tag defaults to the chart's appVersion. */}}
{{- define "liveclone.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "liveclone.dmCloneBuilderImage" -}}
{{ .Values.dmCloneBuilder.image.repository }}:{{ .Values.dmCloneBuilder.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Where the node plugin's CSI socket lives on the host (kubelet dials it). */}}
{{- define "liveclone.pluginDir" -}}
{{ trimSuffix "/" .Values.node.kubeletDir }}/plugins/{{ include "liveclone.driverName" . }}
{{- end }}

{{/* Whether the VolumeSnapshotClass is rendered: "true" or "". */}}
{{- define "liveclone.snapshotClassEnabled" -}}
{{- $create := toString .Values.snapshotClass.create -}}
{{- if eq $create "true" -}}
true
{{- else if and (eq $create "auto") (.Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1/VolumeSnapshotClass") -}}
true
{{- end -}}
{{- end }}

{{/*
Checks across values that the schema cannot express: names given twice, a
StorageClass naming a device class that is not declared, more than one
default class. Renders nothing; fails the install with a message.
*/}}
{{- define "liveclone.validate" -}}
{{- $classes := dict "file" true -}}
{{- range .Values.deviceClasses -}}
{{- if hasKey $classes .name -}}
{{- fail (printf "deviceClasses: %q is given twice (or is `file`, the file pool's name)" .name) -}}
{{- end -}}
{{- $_ := set $classes .name true -}}
{{- end -}}
{{- $storageClasses := dict -}}
{{- $defaults := 0 -}}
{{- range .Values.storageClasses -}}
{{- if hasKey $storageClasses .name -}}
{{- fail (printf "storageClasses: %q is given twice" .name) -}}
{{- end -}}
{{- $_ := set $storageClasses .name true -}}
{{- if not (hasKey $classes .deviceClass) -}}
{{- fail (printf "storageClasses: %q names the device class %q, which is neither `file` nor in deviceClasses" .name .deviceClass) -}}
{{- end -}}
{{- if .default -}}
{{- $defaults = add1 $defaults -}}
{{- end -}}
{{- end -}}
{{- if gt (int $defaults) 1 -}}
{{- fail "storageClasses: more than one is marked default" -}}
{{- end -}}
{{- end }}

{{/*
The securityContext of every container that needs nothing from the host:
no privilege, no capabilities, a read-only root.
*/}}
{{- define "liveclone.restrictedContainer" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}
