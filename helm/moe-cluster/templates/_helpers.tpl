{{/* Names, labels and the pieces every role shares. */}}

{{- define "moe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "moe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "moe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Recommended labels; call with (dict "ctx" $ "component" "router"). */}}
{{- define "moe.labels" -}}
helm.sh/chart: {{ include "moe.chart" .ctx }}
{{ include "moe.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: moe-cluster
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "moe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "moe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Service names. */}}
{{- define "moe.router.name" -}}{{ include "moe.fullname" . }}-router{{- end -}}
{{- define "moe.expert.name" -}}{{ include "moe.fullname" . }}-expert{{- end -}}
{{- define "moe.coordinator.name" -}}{{ include "moe.fullname" . }}-coordinator{{- end -}}
{{- define "moe.etcd.name" -}}{{ include "moe.fullname" . }}-etcd{{- end -}}
{{- define "moe.etcd.headless" -}}{{ include "moe.fullname" . }}-etcd-headless{{- end -}}

{{/* The stable DNS suffix of a StatefulSet's pods: <service>.<namespace>.svc.<domain>. */}}
{{- define "moe.podDomain" -}}
{{- printf "%s.%s.svc.%s" .service .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{/* `https` when roles reach etcd over TLS. */}}
{{- define "moe.etcd.scheme" -}}
{{- if .Values.etcd.client.tls.existingSecret -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* The etcd endpoints every role gets as --etcd: every member, or the external ones. */}}
{{- define "moe.etcd.endpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $eps := list -}}
{{- $domain := include "moe.podDomain" (dict "ctx" . "service" (include "moe.etcd.headless" .)) -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "%s://%s-%d.%s:%d" (include "moe.etcd.scheme" $) (include "moe.etcd.name" $) $i $domain (int $.Values.etcd.clientPort)) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd.enabled is false: set etcd.external.endpoints to the etcd cluster every role should use" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* Flags every cluster role shares (moe's ClusterArgs and global flags). */}}
{{- define "moe.clusterArgs" -}}
- --etcd={{ include "moe.etcd.endpoints" . }}
- --cluster={{ .Values.cluster.name }}
- --lease-ttl-ms={{ int64 .Values.cluster.leaseTtlMs }}
- --load-publish-ms={{ int64 .Values.cluster.loadPublishMs }}
- --log={{ .Values.cluster.log }}
{{- if .Values.cluster.threads }}
- --threads={{ int64 .Values.cluster.threads }}
{{- end }}
- --model={{ include "moe.modelDir" . }}
{{- with .Values.etcd.client.tls }}
{{- if .existingSecret }}
- --etcd-ca=/etc/moe/etcd-tls/{{ .caKey }}
{{- if .certKey }}
- --etcd-cert=/etc/moe/etcd-tls/{{ .certKey }}
- --etcd-key=/etc/moe/etcd-tls/{{ .keyKey }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.etcd.client.auth }}
{{- if .existingSecret }}
- --etcd-password-file=/etc/moe/etcd-auth/{{ .passwordKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The etcd user's name (from its Secret), for the containers of cluster roles. */}}
{{- define "moe.etcdClientEnv" -}}
{{- with .Values.etcd.client.auth }}
{{- if .existingSecret }}
- name: MOE_ETCD_USER
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .usernameKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The Secrets of etcd's client TLS and user, as volumes and read-only mounts. */}}
{{- define "moe.etcdClientVolumes" -}}
{{- with .Values.etcd.client.tls }}
{{- if .existingSecret }}
- name: etcd-tls
  secret:
    secretName: {{ .existingSecret }}
{{- end }}
{{- end }}
{{- with .Values.etcd.client.auth }}
{{- if .existingSecret }}
- name: etcd-auth
  secret:
    secretName: {{ .existingSecret }}
    items:
      - key: {{ .passwordKey }}
        path: {{ .passwordKey }}
{{- end }}
{{- end }}
{{- end -}}
{{- define "moe.etcdClientMounts" -}}
{{- if .Values.etcd.client.tls.existingSecret }}
- name: etcd-tls
  mountPath: /etc/moe/etcd-tls
  readOnly: true
{{- end }}
{{- if .Values.etcd.client.auth.existingSecret }}
- name: etcd-auth
  mountPath: /etc/moe/etcd-auth
  readOnly: true
{{- end }}
{{- end -}}

{{- define "moe.modelDir" -}}
{{- if .Values.model.subPath -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.subPath) -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "moe.modelClaim" -}}
{{- if eq .Values.model.volume.type "existingClaim" -}}
{{- required "model.volume.existingClaim is required with model.volume.type existingClaim" .Values.model.volume.existingClaim -}}
{{- else -}}
{{- include "moe.fullname" . }}-model
{{- end -}}
{{- end -}}

{{/* The model volume (pod spec `volumes` entry) and its read-only mount. */}}
{{- define "moe.modelVolume" -}}
- name: model
{{- if eq .Values.model.volume.type "hostPath" }}
  hostPath:
    path: {{ .Values.model.volume.hostPath.path }}
    type: {{ .Values.model.volume.hostPath.type }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "moe.modelClaim" . }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "moe.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end -}}

{{/* The downward-API variables the flags refer to as $(POD_NAME) etc. */}}
{{- define "moe.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* Pod-level settings every moe pod shares. Call with (dict "ctx" $ "role" .Values.router). */}}
{{- define "moe.podCommon" -}}
serviceAccountName: {{ include "moe.serviceAccountName" .ctx }}
automountServiceAccountToken: {{ .ctx.Values.serviceAccount.automountServiceAccountToken }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .role.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
topologySpreadConstraints:
{{- if .role.topologySpreadConstraints }}
  {{- toYaml .role.topologySpreadConstraints | nindent 2 }}
{{- else }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "moe.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 8 }}
{{- end }}
{{- end -}}

{{/* Scratch space for a read-only root filesystem. */}}
{{- define "moe.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}
{{- define "moe.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Cluster mTLS flags, volume and mount for a role; call with (dict "ctx" $ "secret" NAME). */}}
{{- define "moe.clusterTlsCheck" -}}
{{- $t := .Values.cluster.tls -}}
{{- if and (or $t.routerSecret $t.nodeSecret) (not (and $t.routerSecret $t.nodeSecret)) -}}
{{- fail "cluster.tls needs both routerSecret and nodeSecret (or neither)" -}}
{{- end -}}
{{- end -}}
{{- define "moe.clusterTlsArgs" -}}
{{- if .secret }}
- --cluster-tls-ca=/etc/moe/cluster-tls/ca.crt
- --cluster-tls-cert=/etc/moe/cluster-tls/tls.crt
- --cluster-tls-key=/etc/moe/cluster-tls/tls.key
{{- end }}
{{- end -}}
{{- define "moe.clusterTlsVolume" -}}
{{- if .secret }}
- name: cluster-tls
  secret:
    secretName: {{ .secret }}
{{- end }}
{{- end -}}
{{- define "moe.clusterTlsMount" -}}
{{- if .secret }}
- name: cluster-tls
  mountPath: /etc/moe/cluster-tls
  readOnly: true
{{- end }}
{{- end -}}
