{{/*
Names, labels and the one pod template that every Ray pod (head and workers of the RayCluster and of
the RayService's cluster) is built from.
*/}}

{{/* Chart name, for labels. */}}
{{- define "raytrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name, used as the RayCluster name. KubeRay rejects RayCluster names over 53 characters and names
its token Secret after the cluster, shortened to 50: keeping 50 makes the Secret name equal the cluster
name.
*/}}
{{- define "raytrain.fullname" -}}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride }}
{{- else }}
{{- $chart := default .Chart.Name .Values.nameOverride }}
{{- if contains $chart .Release.Name }}
{{- $name = .Release.Name }}
{{- else }}
{{- $name = printf "%s-%s" .Release.Name $chart }}
{{- end }}
{{- end }}
{{- $name = $name | trunc 50 | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "name %q is not usable for a RayCluster: KubeRay needs a DNS-1035 label (lower-case letters, digits and '-', starting with a letter); set fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* RayCluster name. */}}
{{- define "raytrain.clusterName" -}}
{{- include "raytrain.fullname" . }}
{{- end }}

{{/*
RayService name. KubeRay allows 47 characters (it appends "-xxxxx" for the cluster it creates), and
names the Services after it: <name>-serve-svc and <name>-head-svc.
*/}}
{{- define "raytrain.serviceName" -}}
{{- printf "%s-llm" (include "raytrain.fullname" . | trunc 43 | trimSuffix "-") }}
{{- end }}

{{/* Claim mounted at persistence.mountPath. */}}
{{- define "raytrain.claimName" -}}
{{- default (printf "%s-artifacts" (include "raytrain.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Chart label value. */}}
{{- define "raytrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels. */}}
{{- define "raytrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raytrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object the chart creates. Call with (dict "root" $ "component" "..."). */}}
{{- define "raytrain.labels" -}}
helm.sh/chart: {{ include "raytrain.chart" .root }}
{{ include "raytrain.selectorLabels" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: raytrain
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of Ray pods. app.kubernetes.io/name is left to KubeRay: it sets it on every Ray pod and selects
the head pod by it.
*/}}
{{- define "raytrain.podLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: raytrain
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Resources of a Ray container: the group's requests / limits, plus an nvidia.com/gpu limit when the
group asks for GPUs (Kubernetes sets the request of an extended resource equal to its limit).
Call with a group (head or worker group values).
*/}}
{{- define "raytrain.resources" -}}
{{- $res := deepCopy (default (dict) .resources) }}
{{- $gpus := int (default 0 .gpus) }}
{{- if gt $gpus 0 }}
{{- $limits := default (dict) (get $res "limits") }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
The pod template of every Ray pod. Call with
  (dict "root" $ "nodeType" "head"|"worker" "group" <head or worker group values> "component" "...")
KubeRay adds the ray start command, the /dev/shm volume, probes, the token env vars and (on the head)
the autoscaler sidecar; the first container must be the Ray container.
*/}}
{{- define "raytrain.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $group := .group }}
{{- $serving := eq .component "serving" }}
{{- $apiKeys := and $serving $v.serving.apiKeys.existingSecret }}
{{- $env := concat (include "raytrain.objectStoreEnv" (dict "root" $root "serving" $serving) | fromYamlArray) $v.env }}
{{- if $apiKeys }}
{{- $env = append $env (dict "name" "RAYTRAIN_API_KEYS_FILE" "value" (include "raytrain.apiKeysFile" $root)) }}
{{- end -}}
{{- if $serving }}
{{- /* Serve's ingress is read by every Ray process of the serving cluster when it starts (Ray 2.55+). */ -}}
{{- $env = append $env (dict "name" "RAY_SERVE_ENABLE_HA_PROXY" "value" (ternary "1" "0" $v.serving.haproxy)) }}
{{- /* The app's code on the replica's main event loop (raytrain.cluster.SERVE_APP_ENV). */ -}}
{{- $env = append $env (dict "name" "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" "value" "0") }}
{{- end -}}
metadata:
  labels:
    {{- include "raytrain.podLabels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  serviceAccountName: {{ include "raytrain.serviceAccountName" $root }}
  # Only the head's autoscaler talks to the Kubernetes API.
  automountServiceAccountToken: {{ and (eq .nodeType "head") $v.autoscaling.enabled }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .nodeType }}
      image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- if eq .nodeType "head" }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        - name: serve
          containerPort: 8000
      {{- end }}
      resources:
        {{- include "raytrain.resources" $group | nindent 8 }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      {{- with $env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "raytrain.scratchMounts" $root | trim | nindent 8 }}
        {{- if $v.persistence.enabled }}
        - name: shared-storage
          mountPath: {{ $v.persistence.mountPath }}
          {{- if $serving }}
          # Serving faces the internet and only reads models: it must not write where training reads.
          readOnly: true
          {{- end }}
        {{- end }}
        {{- if $apiKeys }}
        - name: api-keys
          mountPath: {{ include "raytrain.apiKeysDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    {{- include "raytrain.scratchVolumes" $root | trim | nindent 4 }}
    {{- if $v.persistence.enabled }}
    - name: shared-storage
      persistentVolumeClaim:
        claimName: {{ include "raytrain.claimName" $root }}
        {{- if $serving }}
        readOnly: true
        {{- end }}
    {{- end }}
    {{- if $apiKeys }}
    - name: api-keys
      secret:
        secretName: {{ $v.serving.apiKeys.existingSecret }}
        defaultMode: 0440
    {{- end }}
{{- end }}

{{/*
Writable directories of a read-only root filesystem. /tmp/ray is the volume KubeRay itself calls
`ray-logs`: it then reuses it for the autoscaler sidecar instead of adding a second one.
*/}}
{{- define "raytrain.scratchMounts" -}}
{{- range $i, $path := .Values.scratch.paths }}
- name: scratch-{{ $i }}
  mountPath: {{ $path }}
{{- end }}
{{- /* after /tmp, which it sits in */}}
- name: ray-logs
  mountPath: /tmp/ray
{{- end }}

{{- define "raytrain.scratchVolumes" -}}
{{- $empty := dict }}
{{- with .Values.scratch.sizeLimit }}
{{- $empty = dict "sizeLimit" . }}
{{- end }}
- name: ray-logs
  emptyDir: {{ toJson $empty }}
{{- range $i, $path := .Values.scratch.paths }}
- name: scratch-{{ $i }}
  emptyDir: {{ toJson $empty }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the Ray pods. */}}
{{- define "raytrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "raytrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Object-store environment (pyarrow.fs reads the AWS_* variables), as a YAML list. Call with
(dict "root" $ "serving" <bool>). Serving pods get serving.storageCredentials (meant to be read-only),
never objectStore.credentialsSecret: DeepSpeed unpickles checkpoints, so an internet-facing pod that can
write where training reads could run code on the training clusters.
*/}}
{{- define "raytrain.objectStoreEnv" -}}
{{- $o := .root.Values.objectStore }}
{{- $keys := dict "secret" $o.credentialsSecret "id" $o.accessKeyIdKey "key" $o.secretAccessKeyKey }}
{{- if .serving }}
{{- $c := default (dict) .root.Values.serving.storageCredentials }}
{{- $keys = dict "secret" $c.existingSecret "id" $c.accessKeyIdKey "key" $c.secretAccessKeyKey }}
{{- end }}
{{- $env := list }}
{{- with $o.endpoint }}
{{- $env = append $env (dict "name" "AWS_ENDPOINT_URL" "value" .) }}
{{- end }}
{{- with $o.region }}
{{- $env = append $env (dict "name" "AWS_DEFAULT_REGION" "value" .) }}
{{- end }}
{{- with $keys.secret }}
{{- $env = append $env (dict "name" "AWS_ACCESS_KEY_ID" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $keys.id))) }}
{{- $env = append $env (dict "name" "AWS_SECRET_ACCESS_KEY" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $keys.key))) }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/* Where the serving pods mount the API-key Secret, and the keys file in it (RAYTRAIN_API_KEYS_FILE). */}}
{{- define "raytrain.apiKeysDir" -}}
/etc/raytrain/api-keys
{{- end }}

{{- define "raytrain.apiKeysFile" -}}
{{- printf "%s/%s" (include "raytrain.apiKeysDir" .) .Values.serving.apiKeys.key }}
{{- end }}

{{/* Storage root the chart's RayJobs pass as storage.root; empty when the recipe's own applies. */}}
{{- define "raytrain.storageRoot" -}}
{{- if .Values.objectStore.root }}
{{- .Values.objectStore.root }}
{{- else if .Values.persistence.enabled }}
{{- printf "%s/artifacts" .Values.persistence.mountPath }}
{{- end }}
{{- end }}

{{/* Selector of every Ray pod of this release (RayCluster, RayService cluster, RayJob clusters). */}}
{{- define "raytrain.raySelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: raytrain
{{- end }}

{{/*
Checks the schema cannot express: replica bounds and unique group names. Call with
(dict "groups" <list> "key" "workerGroups").
*/}}
{{- define "raytrain.checkWorkerGroups" -}}
{{- $seen := dict }}
{{- range $i, $g := .groups }}
{{- $where := printf "%s[%d] (%s)" $.key $i $g.name }}
{{- if hasKey $seen $g.name }}
{{- fail (printf "%s: group name %q is used twice; worker group names must be unique" $where $g.name) }}
{{- end }}
{{- $_ := set $seen $g.name true }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "%s: minReplicas (%d) must not exceed maxReplicas (%d)" $where (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s: replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" $where (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A RayCluster spec, shared by the RayCluster and the RayService's rayClusterConfig. Call with
(dict "root" $ "component" "..." "workerGroups" <list> "key" "<values key of the list>").
*/}}
{{- define "raytrain.rayClusterSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $component := .component }}
{{- include "raytrain.checkWorkerGroups" (dict "groups" .workerGroups "key" .key) -}}
rayVersion: {{ $v.rayVersion | quote }}
{{- if $v.auth.enabled }}
authOptions:
  mode: token
  {{- with $v.auth.secretName }}
  secretName: {{ . | quote }}
  {{- end }}
{{- end }}
enableInTreeAutoscaling: {{ $v.autoscaling.enabled }}
{{- if $v.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ int $v.autoscaling.idleTimeoutSeconds }}
  upscalingMode: {{ $v.autoscaling.upscalingMode }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.autoscaling.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
  # The sidecar shares the head's scratch volumes (KubeRay mounts /tmp/ray itself).
  volumeMounts:
    {{- range $i, $path := $v.scratch.paths }}
    - name: scratch-{{ $i }}
      mountPath: {{ $path }}
    {{- end }}
{{- end }}
headGroupSpec:
  {{- with $v.head.rayStartParams }}
  rayStartParams:
    {{- toYaml . | nindent 4 }}
  {{- else }}
  rayStartParams: {}
  {{- end }}
  template:
    {{- include "raytrain.podTemplate" (dict "root" $root "nodeType" "head" "group" $v.head "component" $component) | nindent 4 }}
workerGroupSpecs:
  {{- range .workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ int .replicas }}
    minReplicas: {{ int .minReplicas }}
    maxReplicas: {{ int .maxReplicas }}
    rayStartParams: {}
    template:
      {{- include "raytrain.podTemplate" (dict "root" $root "nodeType" "worker" "group" . "component" $component) | nindent 6 }}
  {{- end }}
{{- end }}

{{/*
Ray Serve config (serveConfigV2) of the RayService: one application built by serving.app:build_app with
args from .Values.serving. With an API-key Secret, `auth` is on and reads the keys file named by
RAYTRAIN_API_KEYS_FILE, which the pod template sets on the serving pods to where it mounts the Secret
(serving.config.AuthConfig; a replica that finds no key refuses to start).
*/}}
{{- define "raytrain.serveConfig" -}}
{{- $s := .Values.serving }}
{{- $models := list }}
{{- range $s.models }}
{{- $m := dict "name" .name "path" .path }}
{{- if .version }}{{- $_ := set $m "version" .version }}{{- end }}
{{- if .alias }}{{- $_ := set $m "alias" .alias }}{{- end }}
{{- $models = append $models $m }}
{{- end }}
{{- $args := dict
      "models" $models
      "max_tokens_limit" (int $s.maxTokensLimit)
      "min_replicas" (int $s.minReplicas)
      "max_replicas" (int $s.maxReplicas)
      "target_ongoing_requests" (float64 $s.targetOngoingRequests) }}
{{- if $s.apiKeys.existingSecret }}
{{- $_ := set $args "auth" (dict "enabled" true "keys_file_env" "RAYTRAIN_API_KEYS_FILE") }}
{{- end }}
{{- $app := dict "name" $s.appName "import_path" "serving.app:build_app" "route_prefix" "/" "args" $args }}
{{- toYaml (dict
      "proxy_location" "EveryNode"
      "http_options" (dict "host" "0.0.0.0" "port" 8000)
      "applications" (list $app)) }}
{{- end }}
